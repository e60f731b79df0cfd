"""``braid export``: a Hugging Face folder of the policy in a checkpoint, for transformers and vLLM.

    braid export runs/arith-grpo-cpu out/policy            # the run's latest checkpoint
    braid export runs/arith-grpo-cpu/checkpoints/step_000040 out/policy --dtype bfloat16

The ZeRO-3 partitions of every learner rank are merged in this process (no Ray, no GPU), one
tensor at a time, into the base model's architecture; the tokenizer comes from the base model.
A run with LoRA adapters (``model.lora``) exports the weights with the adapters merged (in
fp32) to OUT and the adapters as a peft folder to ``OUT-adapter``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from core.errors import RecipeError
from orchestrator import checkpoint


def export(source: str | Path, out: str | Path, dtype: str | None = None) -> Path:
    ckpt = checkpoint.find(Path(source), str(source))
    state = checkpoint.read_state(ckpt)
    base = state.get("model_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise RecipeError(f"{ckpt}: the base model {base!r} the checkpoint was trained from is "
                          "not there (its config and tokenizer are needed)")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(base)
    target = getattr(torch, dtype) if dtype else (getattr(config, "dtype", None) or torch.float32)
    if isinstance(target, str):
        target = getattr(torch, target)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    weights = _module_states(ckpt, bool(state.get("lora")))
    if weights is None:
        weights = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="learner",
                                                           lazy_mode=True)
    adapter = None
    if state.get("lora"):
        weights, adapter = _merged(state["lora"], weights, target)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    expected = set(model.state_dict())
    missing, unexpected = expected - set(weights) - tied, set(weights) - expected
    if missing or unexpected:
        raise RuntimeError(f"{ckpt}: the checkpoint does not match {base}: missing "
                           f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict({k: _cast(v.contiguous(), target) for k, v in weights.items()},
                          strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    if adapter is not None:
        adapter = _write_adapter(state["lora"], adapter, Path(str(out) + "-adapter"))
    print(f"exported {ckpt} (step {state['step']}, weight version {state['weight_version']}) "
          f"to {out} as {str(target).removeprefix('torch.')}"
          + (f", its LoRA adapters to {adapter}" if adapter else ""))
    return out


def _module_states(ckpt: Path, lora: bool):
    """The learner's weights from DeepSpeed's module file, when it holds them whole: ZeRO stage
    0 (LoRA's default) writes no partitions, and stages 1-2 keep frozen parameters only there.
    None under ZeRO-3 (the file holds placeholders) or for full fine-tuning past stage 0, whose
    fp32 master weights are in the partitions."""
    import torch

    zero = any((ckpt / "learner").glob("*zero_pp_rank_*_optim_states.pt"))
    if zero and not lora:
        return None
    module = torch.load(ckpt / "learner" / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)["module"]
    return module if all(t.numel() > 0 for t in module.values()) else None


def _merged(lora: dict, weights, dtype) -> tuple[dict, dict]:
    """The checkpoint's weights with its LoRA adapters merged in (cast to ``dtype`` one at a
    time), and the adapter folder's tensors."""
    from orchestrator.config import LoraConfig
    from workers.learner.adapters import merge_state

    cfg = LoraConfig.model_validate(lora)
    return merge_state(weights, cfg.alpha / cfg.rank, dtype)


def _write_adapter(lora: dict, tensors: dict, path: Path) -> Path:
    from orchestrator.config import LoraConfig
    from workers.learner.adapters import LoraModel

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    LoraModel(LoraConfig.model_validate(lora)).save_adapter(tensors, str(tmp))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def _cast(t, dtype):
    return t.to(dtype) if t.dtype.is_floating_point else t
