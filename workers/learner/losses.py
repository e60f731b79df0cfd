"""Per-token log-probs and loss functions over flat completion-token vectors (see
``packing.PackedBatch``). Pure torch, unit-tested without Ray.

All losses return a *sum* over their tokens (or sequences) divided by a normaliser that the
caller computes over the whole global batch — every micro-batch on every data-parallel rank —
so that gradient accumulation and data parallelism give the same update as one large batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _chunk_logprobs(hidden: torch.Tensor, targets: torch.Tensor, head, temperature: float,
                    with_entropy: bool, softcap: float | None):
    logits = head(hidden).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    if not with_entropy:
        return logp, None
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def token_logprobs(hidden: torch.Tensor, targets: torch.Tensor, head, temperature: float = 1.0,
                   with_entropy: bool = False, chunk_tokens: int | None = None,
                   softcap: float | None = None, n_chunks: int | None = None):
    """Log-prob of each target token [N] and, optionally, the entropy of each position [N],
    from hidden states [N, H] and the vocabulary projection ``head``.

    With ``chunk_tokens``, ``chunk_tokens`` positions at a time go through the head and the
    fp32 log-softmax, each chunk under activation checkpointing: no more than one chunk's
    vocabulary-wide logits exist at once, in the forward pass or the backward. Without it,
    one pass over all positions (the reference the chunked path is tested against).
    ``n_chunks`` (at least the chunks needed) runs that many passes, the last ones empty: under
    ZeRO-3 each pass gathers the head's weight collectively, so every rank must run as many.
    """
    if not chunk_tokens:
        return _chunk_logprobs(hidden, targets, head, temperature, with_entropy, softcap)
    from torch.utils.checkpoint import checkpoint

    logps, ents = [], []
    needed = max(1, -(-hidden.shape[0] // chunk_tokens))
    if n_chunks is not None and n_chunks < needed:
        raise ValueError(f"{hidden.shape[0]} tokens need {needed} chunks, not {n_chunks}")
    for s in range(0, (n_chunks or needed) * chunk_tokens, chunk_tokens):
        args = (hidden[s:s + chunk_tokens], targets[s:s + chunk_tokens], head, temperature,
                with_entropy, softcap)
        logp, ent = (checkpoint(_chunk_logprobs, *args, use_reentrant=False)
                     if torch.is_grad_enabled() else _chunk_logprobs(*args))
        logps.append(logp)
        ents.append(ent)
    return torch.cat(logps), (torch.cat(ents) if with_entropy else None)


def aggregate(per_token: torch.Tensor, batch, mode: str, total_tokens: float,
              total_seqs: float) -> torch.Tensor:
    """Sum this micro-batch's share of a loss whose mean is taken over the *global* batch.

    token_mean: every completion token of the global batch weighs the same.
    seq_mean_token_mean: each sequence's token mean, averaged over the global sequences.
    """
    # where, not a product: a zero-weight filler token's loss may be inf (its KL), and inf * 0
    # is NaN; its gradient through where is 0
    per_token = torch.where(batch.weight > 0, per_token * batch.weight, 0.0)
    if mode == "token_mean":
        return per_token.sum() / max(total_tokens, 1.0)
    if mode == "seq_mean_token_mean":
        return (per_token / batch.seq_len.clamp(min=1.0)).sum() / max(total_seqs, 1.0)
    raise ValueError(f"unknown loss aggregation {mode!r}")


def grpo_loss(logp: torch.Tensor, batch, clip_low: float, clip_high: float,
              kl_coef: float = 0.0, entropy: torch.Tensor | None = None,
              entropy_coef: float = 0.0, tis_cap: float | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token PPO-clip policy-gradient loss with optional k3 KL and entropy bonus.

    Returns the per-token loss [N] and per-token diagnostics (weighted by the caller).
    Tokens without a behaviour log-prob (NaN) are on-policy: their ratio is 1.

    ``tis_cap`` (truncated importance sampling, for one optimizer step per update): the ratio is
    taken to the learner's own log-probs before the step (the proximal policy: ``logp``
    detached, so ratio 1 and the clip inactive) and each token's loss is weighted by
    ``min(pi_prox / pi_behaviour, tis_cap)``, detached — an importance weight for rollouts
    sampled by older weights (or by an engine whose numerics differ), truncated to bound its
    variance. Without it the ratio is to the behaviour log-probs themselves and the clip bounds
    how far a stale token can pull.
    """
    adv = batch.advantages
    prox = logp.detach()
    behaviour = torch.where(torch.isnan(batch.old_logprobs), prox, batch.old_logprobs)
    old = prox if tis_cap is not None else behaviour
    log_ratio = logp - old
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(pg1, pg2)
    diag = {"clipfrac": (pg2 > pg1).float(), "ratio": ratio.detach(),
            "logprob_diff": (prox - behaviour).abs()}
    if tis_cap is not None:
        rho = torch.exp(prox - behaviour)
        weight = rho.clamp(max=tis_cap)
        per_token = per_token * weight
        diag["tis_weight"], diag["tis_truncated"] = weight, (rho > tis_cap).float()
    if kl_coef:
        d = batch.ref_logprobs - logp
        kl = torch.exp(d) - d - 1.0  # k3 estimator, >= 0
        per_token = per_token + kl_coef * kl
        diag["kl"] = kl.detach()
    if entropy is not None and entropy_coef:
        per_token = per_token - entropy_coef * entropy
    return per_token, diag


def sft_loss(logp: torch.Tensor, token_weight: str = "none") -> torch.Tensor:
    """Token negative log-likelihood of the demonstration tokens (weighted by the caller).

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
    return -advantages * (p / (p + gamma))
