"""A causal LM as the learner and the reference use it: packed rows in, token log-probs out."""

from __future__ import annotations

import torch

from workers.learner import losses
from workers.learner.packing import PackedBatch


class TokenLogprobs(torch.nn.Module):
    """A transformers causal LM whose forward maps a ``PackedBatch`` to the log-probs (and
    entropies) of its completion tokens.

    The model's own children are registered under their own names, so parameter names, state
    dicts, checkpoints and weight sync are the model's. The decoder runs on the packed sequence
    (position ids restart per row); the vocabulary projection runs only on the positions that
    predict a completion token, in chunks (``losses.token_logprobs``).
    """

    def __init__(self, lm, chunk_tokens: int | None = None):
        super().__init__()
        if list(lm.named_parameters(recurse=False)):
            raise ValueError(f"{type(lm).__name__} holds parameters outside its submodules")
        cfg = lm.config
        scaled = [k for k in ("logit_scale", "logits_scaling")
                  if getattr(cfg, k, None) not in (None, 1, 1.0)]
        if scaled:
            raise ValueError(f"{type(lm).__name__} scales its logits ({', '.join(scaled)}); "
                             "braid's log-prob path computes lm_head(hidden) only")
        for name, child in lm.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "lm", lm)  # the same modules, not registered twice
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.chunk_tokens = chunk_tokens

    def forward(self, batch: PackedBatch, temperature: float = 1.0, with_entropy: bool = False,
                n_chunks: int | None = None):
        out = self.lm.get_decoder()(input_ids=batch.input_ids, position_ids=batch.position_ids,
                                    use_cache=False)
        hidden = out.last_hidden_state[0].index_select(0, batch.positions)
        return losses.token_logprobs(hidden, batch.targets, self.lm.get_output_embeddings(),
                                     temperature, with_entropy, self.chunk_tokens, self.softcap,
                                     n_chunks)

    def chunks_for(self, tokens: int) -> int:
        """Passes through the vocabulary projection for ``tokens`` completion tokens."""
        return max(1, -(-tokens // self.chunk_tokens)) if self.chunk_tokens else 1


def attn_implementation(choice: str | None) -> str:
    """The attention kernel: flash-attn's variable-length kernel on GPU when installed (packed
    rows without padding), else PyTorch's sdpa with a block-diagonal mask."""
    if choice:
        return choice
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"
