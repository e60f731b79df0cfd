"""Tiny models and tokenizers built offline, for the embedded arithmetic task and for tests.

No hub access is needed: the tokenizer is a character vocabulary assembled with `tokenizers`,
the model a Llama built from a config with random weights. Both save as an ordinary Hugging
Face folder that transformers, DeepSpeed and vLLM load like any other checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
ARITH_CHARS = list("0123456789+-*=() ,.:;<>|#abcdefghijklmnopqrstuvwxyz")


class TinyModelSpec(BaseModel):
    """How to build a small Llama and a character tokenizer when `model.path` does not exist."""

    model_config = ConfigDict(extra="forbid")
    arch: Literal["llama"] = "llama"
    hidden_size: int = Field(128, gt=0, description="width; a multiple of num_heads")
    intermediate_size: int = Field(512, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    max_position_embeddings: int = Field(64, gt=0)
    seed: int = 0


def build_char_tokenizer(out_dir: str | Path, chars: list[str] = ARITH_CHARS):
    """A byte-free, character-level tokenizer: one token per character, `<s>` prepended."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_model(out_dir: str | Path, spec: TinyModelSpec | None = None) -> Path:
    """Write a randomly initialised Llama plus a character tokenizer to `out_dir`."""
    import torch
    from transformers import LlamaForCausalLM

    spec = spec or TinyModelSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_char_tokenizer(out)
    torch.manual_seed(spec.seed)
    LlamaForCausalLM(_llama_config(spec, tok)).save_pretrained(str(out))
    (out / "braid_build.json").write_text(json.dumps(spec.model_dump(), indent=2))
    return out


def build_tiny_reward_model(out_dir: str | Path, spec: TinyModelSpec | None = None) -> Path:
    """Write a randomly initialised Llama sequence classifier with one output (a scalar reward
    model, as ``workers.reward_model.RewardModelWorker`` loads) plus the character tokenizer.
    ``config.pad_token_id`` is set: the classifier pools the last token that is not padding."""
    import torch
    from transformers import LlamaForSequenceClassification

    spec = spec or TinyModelSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_char_tokenizer(out)
    cfg = _llama_config(spec, tok, num_labels=1)
    torch.manual_seed(spec.seed)
    LlamaForSequenceClassification(cfg).save_pretrained(str(out))
    (out / "braid_build.json").write_text(json.dumps(spec.model_dump(), indent=2))
    return out


def _llama_config(spec: TinyModelSpec, tok, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok), hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=True, torch_dtype="float32", **extra,
    )
