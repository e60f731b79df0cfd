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
                n_chunks: int | None = None, entropy_grad: bool = True):
        out = self.lm.get_decoder()(input_ids=batch.input_ids, position_ids=batch.position_ids,
                                    use_cache=False)
        hidden = out.last_hidden_state[0].index_select(0, batch.positions)
        return losses.token_logprobs(hidden, batch.targets, self.lm.get_output_embeddings(),
                                     temperature, with_entropy, self.chunk_tokens, self.softcap,
                                     n_chunks, entropy_grad)

    def chunks_for(self, tokens: int) -> int:
        """Passes through the vocabulary projection for ``tokens`` completion tokens."""
        return max(1, -(-tokens // self.chunk_tokens)) if self.chunk_tokens else 1


class TokenValues(torch.nn.Module):
    """A transformers token-classification model with one output (the critic): forward maps a
    ``PackedBatch`` to V(s_t) for every completion token — the output at the position that
    predicts the token. Its children are registered under their own names, as above."""

    def __init__(self, lm):
        super().__init__()
        if lm.config.num_labels != 1:
            raise ValueError(f"a value model has one output, not {lm.config.num_labels}")
        for name, child in lm.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "lm", lm)

    def forward(self, batch: PackedBatch, *_, **__):
        out = self.lm(input_ids=batch.input_ids, position_ids=batch.position_ids,
                      use_cache=False)
        return out.logits[0, :, 0].index_select(0, batch.positions).float(), None

    def chunks_for(self, tokens: int) -> int:
        return 1


VARLEN = "braid_varlen_sdpa"


def varlen_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0,
                scaling: float | None = None, **kwargs):
    """Causal attention within each packed row with PyTorch's sdpa: what flash-attn's
    variable-length kernel computes, on any device. A row's span starts where its position id
    is 0. Rows are grouped by length (a power-of-two class each) and every group runs as one
    batched sdpa call over its rows padded at the end to the group's longest: padding at the end
    is never attended by a real token under the causal mask, and padded positions' outputs are
    dropped. Compute and memory grow with each group's rows x its longest row squared — within
    4x of the sum of squared row lengths, never the square of the packed length (sdpa with
    transformers' block-diagonal mask does the latter) — in a few calls, not one per row."""
    if getattr(module, "sliding_window", None):
        raise ValueError(f"{VARLEN} has no sliding-window attention; set the learner's "
                         "attn_implementation")
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        raise ValueError(f"{VARLEN} takes packed rows without padding")
    pos = kwargs["position_ids"][0]
    total = pos.shape[0]
    starts = (pos == 0).nonzero().flatten()
    if query.shape[0] != 1 or not starts.numel() or int(starts[0]) != 0:
        raise ValueError(f"{VARLEN} takes one packed sequence whose position ids start at 0")
    lengths = torch.diff(starts, append=torch.tensor([total], device=starts.device))
    gqa = query.shape[1] != key.shape[1]
    q, k, v = query[0], key[0], value[0]  # [heads, tokens, dim]
    outs, where = [], []
    for cls in torch.unique(torch.floor(torch.log2(lengths.float()))).tolist():
        rows = (torch.floor(torch.log2(lengths.float())) == cls).nonzero().flatten()
        longest = int(lengths[rows].max())
        steps = torch.arange(longest, device=pos.device)
        valid = steps[None, :] < lengths[rows, None]                     # [n, L]
        index = starts[rows, None] + torch.minimum(steps[None, :], lengths[rows, None] - 1)

        def rows_of(x, index=index):  # [heads, tokens, dim] -> [n, heads, L, dim]
            return x[:, index].permute(1, 0, 2, 3)

        out = torch.nn.functional.scaled_dot_product_attention(
            rows_of(q), rows_of(k), rows_of(v), is_causal=True, scale=scaling,
            dropout_p=dropout if module.training else 0.0, enable_gqa=gqa)
        outs.append(out.permute(1, 0, 2, 3)[:, valid])                   # [heads, kept, dim]
        where.append(index[valid])
    order = torch.empty(total, dtype=torch.long, device=pos.device)
    order[torch.cat(where)] = torch.arange(total, device=pos.device)
    out = torch.cat(outs, dim=1)[:, order]                               # [heads, tokens, dim]
    return out.transpose(0, 1).unsqueeze(0).contiguous(), None


def _register_varlen() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_sdpa)
    AttentionMaskInterface.register(VARLEN, lambda *args, **kwargs: None)


def attn_implementation(choice: str | None, dtype=None) -> str:
    """The attention kernel for packed rows: flash-attn's variable-length kernel on GPU in
    bf16/fp16 when installed, else ``varlen_sdpa`` (registered with transformers here)."""
    _register_varlen()
    if choice:
        return choice
    if torch.cuda.is_available() and dtype in (torch.bfloat16, torch.float16):
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return VARLEN
