"""Loss functions over padded token batches. Pure torch, unit-tested without Ray.

All losses return a *sum* over their tokens (or sequences) divided by a normaliser that the
caller computes over the whole global batch — every micro-batch on every data-parallel rank —
so that gradient accumulation and data parallelism give the same update as one large batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PackedBatch:
    input_ids: torch.Tensor      # [B, L] right-padded prompt+completion
    attention_mask: torch.Tensor  # [B, L]
    loss_mask: torch.Tensor      # [B, L-1] 1 where position t predicts a completion token
    advantages: torch.Tensor     # [B]
    old_logprobs: torch.Tensor   # [B, L-1] behaviour log-probs aligned with loss_mask
    ref_logprobs: torch.Tensor   # [B, L-1] (zeros when unused)
    seq_weight: torch.Tensor     # [B] 0 for padding rows of an empty micro-batch

    def to(self, device) -> PackedBatch:
        return PackedBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int,
         advantages=None, old_logprobs=None, ref_logprobs=None) -> PackedBatch:
    """Right-pad prompt+completion rows; per-token side inputs land at the completion positions."""
    if not prompts:  # an empty micro-batch still runs a forward pass (ZeRO-3 lock-step)
        prompts, completions, weight = [[pad_id]], [[pad_id]], [0.0]
        advantages = old_logprobs = ref_logprobs = None
    else:
        weight = [1.0] * len(prompts)
    B = len(prompts)
    L = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    mask = torch.zeros((B, L - 1))
    old = torch.zeros((B, L - 1))
    ref = torch.zeros((B, L - 1))
    for b, (p, c) in enumerate(zip(prompts, completions)):
        n = len(p) + len(c)
        ids[b, :n] = torch.tensor(p + c)
        attn[b, :n] = 1
        s, e = len(p) - 1, n - 1  # logits at t predict token t+1
        mask[b, s:e] = 1
        if old_logprobs is not None and old_logprobs[b]:
            old[b, s:e] = torch.tensor(old_logprobs[b])
        if ref_logprobs is not None:
            ref[b, s:e] = torch.tensor(ref_logprobs[b])
    adv = torch.tensor(advantages if advantages is not None else [0.0] * B, dtype=torch.float32)
    return PackedBatch(ids, attn, mask * torch.tensor(weight)[:, None], adv, old, ref,
                       torch.tensor(weight))


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0,
                   with_entropy: bool = False):
    """Log-prob of each next token [B, L-1] and, optionally, the entropy of each position."""
    logits = logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logp, entropy


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str,
              total_tokens: float, total_seqs: float) -> torch.Tensor:
    """Sum this micro-batch's share of a loss whose mean is taken over the *global* batch.

    token_mean: every completion token of the global batch weighs the same.
    seq_mean_token_mean: each sequence's token mean, averaged over the global sequences.
    """
    if mode == "token_mean":
        return (per_token * mask).sum() / max(total_tokens, 1.0)
    if mode == "seq_mean_token_mean":
        lens = mask.sum(-1).clamp(min=1.0)
        return ((per_token * mask).sum(-1) / lens).sum() / max(total_seqs, 1.0)
    raise ValueError(f"unknown loss aggregation {mode!r}")


def grpo_loss(logp: torch.Tensor, batch: PackedBatch, clip_low: float, clip_high: float,
              kl_coef: float = 0.0, entropy: torch.Tensor | None = None,
              entropy_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token PPO-clip policy-gradient loss with optional k3 KL and entropy bonus.

    Returns the per-token loss [B, L-1] and per-token diagnostics (masked by the caller).
    """
    adv = batch.advantages[:, None]
    log_ratio = (logp - batch.old_logprobs) * batch.loss_mask
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(pg1, pg2)
    diag = {"clipfrac": (pg2 > pg1).float(), "ratio": ratio.detach()}
    if kl_coef:
        d = (batch.ref_logprobs - logp) * batch.loss_mask
        kl = torch.exp(d) - d - 1.0  # k3 estimator, >= 0
        per_token = per_token + kl_coef * kl
        diag["kl"] = kl.detach()
    if entropy is not None and entropy_coef:
        per_token = per_token - entropy_coef * entropy
    return per_token, diag


def sft_loss(logp: torch.Tensor, token_weight: str = "none") -> torch.Tensor:
    """Token negative log-likelihood of the demonstration tokens (masked by the caller).

    ``token_weight="p(1-p)"`` is CHORD-phi: each token's NLL is weighted by sg(p(1-p)), which
    fades tokens the policy is already sure of and tokens far off its distribution.
    """
    if token_weight == "none":
        return -logp
    if token_weight == "p(1-p)":
        p = logp.detach().exp()
        return -(p * (1.0 - p)) * logp
    raise ValueError(f"unknown token_weight {token_weight!r}")


def off_policy_pg_loss(logp: torch.Tensor, advantages: torch.Tensor,
                       gamma: float) -> torch.Tensor:
    """LUFFY's policy-shaped off-policy term: -A * f(p), f(p) = p / (p + gamma), p = pi(y_t).

    No ratio to the (unknown) behaviour policy; the shaping keeps gradients alive on tokens the
    policy finds unlikely: d f / d log p = gamma * p / (p + gamma)^2.
    """
    p = logp.exp()
    return -advantages[:, None] * (p / (p + gamma))
