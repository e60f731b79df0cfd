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
    if any((ckpt / "learner").glob("*zero_pp_rank_*_optim_states.pt")):
        weights = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="learner",
                                                           lazy_mode=True)
    else:  # ZeRO stage 0 (LoRA's default): the module's state as it is, in one file
        weights = torch.load(ckpt / "learner" / "mp_rank_00_model_states.pt",
                             map_location="cpu", weights_only=False)["module"]
    adapter = None
    if state.get("lora"):
        weights, adapter = _merged(state["lora"], weights, out)
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
    print(f"exported {ckpt} (step {state['step']}, weight version {state['weight_version']}) "
          f"to {out} as {str(target).removeprefix('torch.')}"
          + (f", its LoRA adapters to {adapter}" if adapter else ""))
    return out


def _merged(lora: dict, weights, out) -> tuple[dict, Path]:
    """The checkpoint's weights with its LoRA adapters merged in, and the adapters written as
    a peft folder beside ``out``."""
    from orchestrator.config import LoraConfig
    from workers.learner.adapters import LoraModel, merge_state

    cfg = LoraConfig.model_validate(lora)
    merged, adapter = merge_state(weights, cfg.alpha / cfg.rank)
    path = Path(str(out) + "-adapter")
    shutil.rmtree(path, ignore_errors=True)
    LoraModel(cfg).save_adapter({k: v.contiguous() for k, v in adapter.items()}, str(path))
    return merged, path


def _cast(t, dtype):
    return t.to(dtype) if t.dtype.is_floating_point else t
