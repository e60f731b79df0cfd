"""Rows to ranks, ranks to micro-batches, micro-batches to one padding-free token stream.

Pure Python and torch, unit-tested without Ray. A *row* is a prompt and its completion; its
cost is its token count. The learner

1. deals rows to data-parallel ranks by length (``balance``: longest first, each to the rank
   with the fewest tokens so far), so no rank waits on another's long rows;
2. splits each rank's rows into micro-batches under a token budget and a row cap
   (``micro_batches``: first-fit, longest first); every rank runs the same number of
   micro-batches (ZeRO-3 gathers parameters collectively in each forward), the short ones
   filled with a zero-weight row;
3. concatenates a micro-batch's rows into one sequence (``pack``) whose position ids restart at
   0 for every row: attention then stays within each row — flash-attn's variable-length kernel
   on GPU, ``policy.varlen_sdpa`` (sdpa row by row) otherwise, or transformers' block-diagonal
   mask with plain sdpa/eager — and no token is padding.

Only the positions whose logits predict a completion token are kept (``positions``), so the
vocabulary projection runs on completion tokens alone, and every per-token input (advantage,
behaviour and reference log-prob) is a flat vector over those tokens.

A row may carry a *loss mask* over its completion (a multi-turn trajectory: 1 on the tokens the
policy sampled, 0 on the environment's and the chat template's between its turns). Masked tokens
stay in the sequence — later tokens attend to them — but their weight is 0, so no loss, metric
or token count sees them, and a row's length for sequence means is its unmasked tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


def balance(lengths: list[int], world: int) -> list[list[int]]:
    """Row indices for each rank: longest row first, each to the rank with the fewest tokens
    (ties: fewer rows, then lower rank). Each rank's list is in ascending row order."""
    load = [(0, 0, r) for r in range(world)]
    out: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = min(range(world), key=lambda r: load[r])
        out[k].append(i)
        tokens, rows, _ = load[k]
        load[k] = (tokens + lengths[i], rows + 1, k)
    return [sorted(rows) for rows in out]


def micro_batches(rows: list[int], lengths: list[int], max_tokens: int | None,
                  max_rows: int | None) -> list[list[int]]:
    """Split ``rows`` into micro-batches of at most ``max_tokens`` tokens (a longer row goes
    alone) and ``max_rows`` rows, first-fit over rows sorted longest first."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(rows, key=lambda i: (-lengths[i], i)):
        for b, rest in enumerate(room):
            fits_tokens = max_tokens is None or lengths[i] <= rest
            fits_rows = max_rows is None or len(bins[b]) < max_rows
            if fits_tokens and fits_rows:
                bins[b].append(i)
                room[b] = rest - lengths[i]
                break
        else:
            bins.append([i])
            room.append((max_tokens if max_tokens is not None else 0) - lengths[i])
    return bins


def plan(lengths: list[int], world: int, max_tokens: int | None,
         max_rows: int | None) -> list[list[list[int]]]:
    """Micro-batches of every rank, all ranks with the same count (empty lists pad)."""
    per_rank = [micro_batches(rows, lengths, max_tokens, max_rows)
                for rows in balance(lengths, world)]
    n = max(1, max(len(mbs) for mbs in per_rank))
    return [mbs + [[] for _ in range(n - len(mbs))] for mbs in per_rank]


@dataclass
class PackedBatch:
    input_ids: torch.Tensor     # [1, T] every row's prompt + completion, back to back
    position_ids: torch.Tensor  # [1, T] restarting at 0 on each row
    positions: torch.Tensor     # [N] indices into T whose logits predict a completion token
    targets: torch.Tensor       # [N] the completion token each of those positions predicts
    weight: torch.Tensor        # [N] 1; 0 for masked tokens and an empty micro-batch's filler
    advantages: torch.Tensor    # [N] the row's advantage (one per row, or per token) on each
    old_logprobs: torch.Tensor  # [N] behaviour log-probs (NaN where the row brought none)
    ref_logprobs: torch.Tensor  # [N] reference log-probs (0 where none)
    seq_len: torch.Tensor       # [N] completion tokens of the token's row (unmasked ones)
    row: torch.Tensor           # [N] index of the token's row within the micro-batch
    returns: torch.Tensor       # [N] value targets (the critic; 0 where none)
    old_values: torch.Tensor    # [N] the critic's values before its update (0 where none)

    def to(self, device) -> PackedBatch:
        return PackedBatch(*(getattr(self, f.name).to(device) for f in fields(self)))

    @property
    def n_tokens(self) -> float:
        return float(self.weight.sum())


def _per_token(rows, b: int, n: int, default: float, what: str) -> list[float]:
    """Row b's values for its n completion tokens: a list of n, or one number for all."""
    x = rows[b] if rows is not None else None
    if x is None or (isinstance(x, (list, tuple)) and not x):
        return [default] * n
    if isinstance(x, (list, tuple)):
        if len(x) != n:
            raise ValueError(f"row {b}: {len(x)} {what} for {n} completion tokens")
        return [float(v) for v in x]
    return [float(x)] * n


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int,
         advantages=None, old_logprobs=None, ref_logprobs=None, returns=None,
         old_values=None, masks=None) -> PackedBatch:
    """Concatenate rows into one padding-free sequence; see the module docstring.
    ``advantages``: per row, one number or one per completion token. ``masks``: per row, None
    (every completion token counts) or a 0/1 per completion token."""
    if not prompts:  # an empty micro-batch still runs forward and backward (ZeRO-3 lock-step)
        prompts, completions, w = [[pad_id]], [[pad_id]], 0.0
        advantages = old_logprobs = ref_logprobs = returns = old_values = masks = None
    else:
        w = 1.0
    ids: list[int] = []
    pos: list[int] = []
    keep: list[int] = []
    adv: list[float] = []
    old: list[float] = []
    ref: list[float] = []
    seq_len: list[int] = []
    row: list[int] = []
    weight: list[float] = []
    ret: list[float] = []
    oldv: list[float] = []
    for b, (p, c) in enumerate(zip(prompts, completions)):
        if not p:
            raise ValueError(f"row {b} has an empty prompt: no position predicts its first token")
        start = len(ids)
        ids += p + c
        pos += range(len(p) + len(c))
        keep += range(start + len(p) - 1, start + len(p) + len(c) - 1)  # t predicts t+1
        adv += _per_token(advantages, b, len(c), 0.0, "advantages")
        ret += _per_token(returns, b, len(c), 0.0, "returns")
        oldv += _per_token(old_values, b, len(c), 0.0, "old values")
        lp = old_logprobs[b] if old_logprobs is not None else None
        old += list(lp) if lp else [float("nan")] * len(c)
        rp = ref_logprobs[b] if ref_logprobs is not None else None
        ref += list(rp) if rp else [0.0] * len(c)
        m = _per_token(masks, b, len(c), 1.0, "loss-mask values")
        weight += [w * v for v in m]
        seq_len += [sum(m)] * len(c)
        row += [b] * len(c)
    positions = torch.tensor(keep, dtype=torch.long)
    input_ids = torch.tensor([ids], dtype=torch.long)
    return PackedBatch(
        input_ids=input_ids, position_ids=torch.tensor([pos], dtype=torch.long),
        positions=positions, targets=input_ids[0, positions + 1],
        weight=torch.tensor(weight), advantages=torch.tensor(adv),
        old_logprobs=torch.tensor(old), ref_logprobs=torch.tensor(ref),
        seq_len=torch.tensor(seq_len, dtype=torch.float32), row=torch.tensor(row),
        returns=torch.tensor(ret), old_values=torch.tensor(oldv))


def unpack(values: torch.Tensor, batch: PackedBatch, n_rows: int) -> list[list[float]]:
    """Per-row lists of a per-token vector, for the ``n_rows`` rows packed (in their order)."""
    out: list[list[float]] = [[] for _ in range(n_rows)]
    for r, v in zip(batch.row.tolist(), values.tolist()):
        out[r].append(v)
    return out
