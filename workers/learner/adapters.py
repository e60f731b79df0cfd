"""How the learner's model is built: every weight trained (``FullModel``) or LoRA adapters on a
frozen base (``LoraModel``, peft). The builder also says which parameters train, how the
reference is had (LoRA: the same model with its adapters disabled), what the weights are
called where they go (peft's names for vLLM's adapter loader, the model's own for a merged
folder) and how an adapter folder is written.

peft injects its LoRA layers into the transformers model in place; the learner keeps that model
(wrapped by ``policy.TokenLogprobs``), so parameter names are the model's with peft's layers in
them: ``...q_proj.base_layer.weight``, ``...q_proj.lora_A.default.weight``. The ``PeftModel``
around it is kept for ``disable_adapter`` and ``save_pretrained``.
"""

from __future__ import annotations

ADAPTER = "default"  # peft's adapter name


class FullModel:
    """Full fine-tuning: every parameter trains; the reference is a role of its own."""

    lora = None

    def build(self, lm):
        return lm

    def trainable(self, module) -> list:
        return list(module.parameters())

    def reference(self):
        raise RuntimeError("a fully fine-tuned learner has no reference inside it: "
                           "roles.reference computes the reference log-probs")

    def exporter(self, named: dict, sync: str | None = None):
        from workers.learner.weights import FullWeights

        return FullWeights(named)


class LoraModel:
    """LoRA adapters (``model.lora`` of the recipe) on a frozen base model."""

    def __init__(self, lora):
        from peft import LoraConfig

        self.lora = lora
        self.peft = None
        self.config = LoraConfig(
            r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=lora.target_modules, modules_to_save=lora.modules_to_save or None,
            bias="none")

    def build(self, lm):
        from peft import get_peft_model

        tied = {"lm_head", "embed_tokens"} & set(self.lora.modules_to_save)
        if tied and getattr(lm.config, "tie_word_embeddings", False):
            raise ValueError(f"model.lora.modules_to_save {sorted(tied)}: this model's output "
                             "head is tied to its input embeddings (tie_word_embeddings), and "
                             "training one in full unties them, which its merged weights and "
                             "the engines cannot hold; leave it out")

        # adapters in the model's dtype (peft would keep them in fp32 beside a bf16 model,
        # which ZeRO-3 then holds as fp32 parameters in a bf16 engine); DeepSpeed keeps fp32
        # master copies for the optimizer
        self.peft = get_peft_model(lm, self.config, autocast_adapter_dtype=False)
        self.layers = self._lora_layers(lm)
        if not self.layers:
            raise ValueError(f"model.lora.target_modules {self.lora.target_modules!r} matched no "
                             f"module of {type(lm).__name__}")
        return lm  # the same model, with peft's layers in it

    @staticmethod
    def _lora_layers(lm) -> dict:
        """{module name: peft LoRA layer} of every adapted module; only linear layers (the
        merge and vLLM's loader assume W + s·B·A of plain matrices)."""
        from peft.tuners.lora import Linear, LoraLayer

        out = {}
        for name, mod in lm.named_modules():
            if isinstance(mod, LoraLayer):
                if not isinstance(mod, Linear):
                    raise ValueError(f"model.lora: {name} is a {type(mod).__name__}; braid "
                                     "adapts linear layers only (target_modules)")
                if getattr(mod, "fan_in_fan_out", False):
                    raise ValueError(f"model.lora: {name} stores its weight transposed "
                                     "(fan_in_fan_out, e.g. GPT-2's Conv1D); braid adapts "
                                     "nn.Linear layers only (target_modules)")
                out[name] = mod
        return out

    def trainable(self, module) -> list:
        return [p for p in module.parameters() if p.requires_grad]

    def reference(self):
        """The base model for the block: adapters off (the reference policy)."""
        return self.peft.disable_adapter()

    # --- names --------------------------------------------------------------------------------
    @staticmethod
    def is_adapter(name: str) -> bool:
        """An adapter matrix, or a module trained in full beside them (what an adapter folder
        holds)."""
        return ".lora_A." in name or ".lora_B." in name or ".modules_to_save." in name

    @staticmethod
    def saved_name(name: str) -> str:
        """peft's saved name of an adapter parameter (what vLLM's loader parses)."""
        name = name.replace(f".modules_to_save.{ADAPTER}.", ".")
        return "base_model.model." + name.replace(f".{ADAPTER}.", ".")

    @staticmethod
    def merged_name(name: str) -> str | None:
        """The model's own name of a parameter once the adapters are merged (None: an adapter
        matrix, or the frozen original of a module trained in full)."""
        if ".lora_A." in name or ".lora_B." in name or ".original_module." in name:
            return None
        return name.replace(".base_layer.", ".").replace(f".modules_to_save.{ADAPTER}.", ".")

    def lora_of(self, name: str):
        """(A's name, B's name, scale) when ``name`` is the base weight of an adapted layer."""
        module, _, leaf = name.rpartition(".base_layer.")
        if leaf != "weight" or module not in self.layers:
            return None
        layer = self.layers[module]
        return (f"{module}.lora_A.{ADAPTER}.weight", f"{module}.lora_B.{ADAPTER}.weight",
                float(layer.scaling[ADAPTER]))

    def config_dict(self) -> dict:
        """The adapter's peft config as JSON (what vLLM's PEFTHelper reads)."""
        import json

        out = self.config.to_dict()
        out = {k: sorted(v) if isinstance(v, set) else v for k, v in out.items()}
        return json.loads(json.dumps(out))  # plain values (peft's enums are str subclasses)

    def exporter(self, named: dict, sync: str | None = None):
        from workers.learner.weights import AdapterWeights, MergedWeights

        if (sync or self.lora.sync) == "adapter":
            return AdapterWeights(named, self)
        return MergedWeights(named, self)

    def save_adapter(self, state: dict, path: str) -> None:
        """An adapter folder peft loads (``PeftModel.from_pretrained``), from the gathered
        adapter tensors (saved names)."""
        import json
        from pathlib import Path

        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()},
                  str(out / "adapter_model.safetensors"))
        (out / "adapter_config.json").write_text(json.dumps(self.config_dict(), indent=2))


def merge(w, a, b, scale: float):
    """W + scale·B·A, computed in fp32, in W's dtype (peft's LoRA update of a linear layer)."""
    return (w.float() + scale * (b.float() @ a.float())).to(w.dtype)


def merge_state(weights, scale: float, dtype=None) -> tuple[dict, dict]:
    """A checkpoint's weights (peft's layer names inside the model's) as the model's own
    weights with the adapters merged in fp32 (W + scale·B·A, then cast to ``dtype``, default
    the weight's), and the adapter folder's tensors under peft's saved names; read one tensor
    at a time from ``weights`` (a lazy mapping works)."""
    merged, adapter = {}, {}
    for name in weights.keys():
        if LoraModel.is_adapter(name):
            adapter[LoraModel.saved_name(name)] = weights[name].contiguous()
            if ".modules_to_save." not in name:
                continue
        target = LoraModel.merged_name(name)
        if target is None:
            continue
        module, _, leaf = name.rpartition(".base_layer.")
        w = weights[name].contiguous()
        a_name = f"{module}.lora_A.{ADAPTER}.weight"
        if leaf == "weight" and a_name in weights:
            w = merge(w, weights[a_name].contiguous(),
                      weights[f"{module}.lora_B.{ADAPTER}.weight"].contiguous(), scale)
        merged[target] = w if dtype is None or not w.is_floating_point() else w.to(dtype)
    return merged, adapter


def builder(recipe):
    """The model builder the recipe asks for."""
    return FullModel() if recipe.model.lora is None else LoraModel(recipe.model.lora)
