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
                    with_entropy: bool, softcap: float | None, entropy_grad: bool = True):
    logits = head(hidden).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    if not with_entropy:
        return logp, None
    if entropy_grad:
        return logp, -(logp_all.exp() * logp_all).sum(-1)
    with torch.no_grad():  # a metric: nothing of it is kept for the backward
        return logp, -(logp_all.exp() * logp_all).sum(-1)


def token_logprobs(hidden: torch.Tensor, targets: torch.Tensor, head, temperature: float = 1.0,
                   with_entropy: bool = False, chunk_tokens: int | None = None,
                   softcap: float | None = None, n_chunks: int | None = None,
                   entropy_grad: bool = True):
    """Log-prob of each target token [N] and, optionally, the entropy of each position [N],
    from hidden states [N, H] and the vocabulary projection ``head`` (``entropy_grad``
    False: the entropy as a metric, without a graph).

    With ``chunk_tokens``, ``chunk_tokens`` positions at a time go through the head and the
    fp32 log-softmax, each chunk under activation checkpointing: no more than one chunk's
    vocabulary-wide logits exist at once, in the forward pass or the backward. Without it,
    one pass over all positions (the reference the chunked path is tested against).
    ``n_chunks`` (at least the chunks needed) runs that many passes, the last ones empty: under
    ZeRO-3 each pass gathers the head's weight collectively, so every rank must run as many.
    """
    if not chunk_tokens:
        return _chunk_logprobs(hidden, targets, head, temperature, with_entropy, softcap,
                               entropy_grad)
    from torch.utils.checkpoint import checkpoint

    logps, ents = [], []
    needed = max(1, -(-hidden.shape[0] // chunk_tokens))
    if n_chunks is not None and n_chunks < needed:
        raise ValueError(f"{hidden.shape[0]} tokens need {needed} chunks, not {n_chunks}")
    for s in range(0, (n_chunks or needed) * chunk_tokens, chunk_tokens):
        args = (hidden[s:s + chunk_tokens], targets[s:s + chunk_tokens], head, temperature,
                with_entropy, softcap, entropy_grad)
        logp, ent = (checkpoint(_chunk_logprobs, *args, use_reentrant=False)
                     if torch.is_grad_enabled() else _chunk_logprobs(*args))
        logps.append(logp)
        ents.append(ent)
    return torch.cat(logps), (torch.cat(ents) if with_entropy else None)


def aggregate(per_token: torch.Tensor, batch, mode: str, total_tokens: float,
              total_seqs: float, norm_tokens: float | None = None) -> torch.Tensor:
    """Sum this micro-batch's share of a loss whose mean is taken over the *global* batch.

    token_mean: every completion token of the global batch weighs the same.
    seq_mean_token_mean: each sequence's token mean, averaged over the global sequences.
    seq_mean_token_sum_norm (Dr. GRPO): each sequence's token *sum* divided by the constant
    ``norm_tokens``, averaged over the global sequences — a token weighs the same whatever the
    length of its sequence or of the batch's.
    ``total_seqs`` counts sequences with at least one token (an empty completion has no loss).
    """
    # where, not a product: a zero-weight filler token's loss may be inf (its KL), and inf * 0
    # is NaN; its gradient through where is 0
    per_token = torch.where(batch.weight > 0, per_token * batch.weight, 0.0)
    if mode == "token_mean":
        return per_token.sum() / max(total_tokens, 1.0)
    if mode == "seq_mean_token_mean":
        return (per_token / batch.seq_len.clamp(min=1.0)).sum() / max(total_seqs, 1.0)
    if mode == "seq_mean_token_sum_norm":
        if not norm_tokens:
            raise ValueError("seq_mean_token_sum_norm needs norm_tokens")
        return per_token.sum() / float(norm_tokens) / max(total_seqs, 1.0)
    raise ValueError(f"unknown loss aggregation {mode!r}")


# --- policy losses ------------------------------------------------------------------------
# A policy loss is named in ``algorithm.policy_loss`` (a built-in below or `module:function`):
#   loss(logp, old, advantages, batch, algo) -> (per_token [N], diagnostics {name: [N]})
# logp: the learner's log-probs of the sampled tokens (with gradient); old: the log-probs the
# ratio is taken to (vLLM's behaviour log-probs, or the learner's own detached ones under
# tis_cap); advantages: per token; batch: the packed micro-batch (``batch.row`` says which
# sequence each token belongs to, ``batch.weight`` which tokens count); algo: the recipe's
# ``algorithm`` section. Diagnostics are per-token values the learner reports as token means
# (``clipfrac`` is expected); a loss returns the same names on every call (the ranks sum them
# in one collective). KL, entropy and importance weights are added by the learner around it
# (``policy_gradient_loss``, ``entropy_bonus``), the same for every loss.

def _ratio(log_ratio: torch.Tensor, algo) -> torch.Tensor:
    if algo.log_ratio_clamp:
        log_ratio = log_ratio.clamp(-algo.log_ratio_clamp, algo.log_ratio_clamp)
    return torch.exp(log_ratio)


def _clipped(ratio: torch.Tensor, adv: torch.Tensor, algo):
    """PPO's pessimistic clipped objective, with dual-clip; per-token loss and clip mask."""
    pg1 = -adv * ratio
    if algo.clip is None:
        per_token, clipped = pg1, torch.zeros_like(pg1)
    else:
        high = algo.clip_high if algo.clip_high is not None else algo.clip
        pg2 = -adv * ratio.clamp(1.0 - algo.clip, 1.0 + high)
        per_token, clipped = torch.maximum(pg1, pg2), (pg2 > pg1).float()
    if algo.dual_clip:
        pg3 = -adv * algo.dual_clip
        dual = (adv < 0) & (per_token > pg3)
        per_token = torch.where(dual, pg3, per_token)
        clipped = torch.maximum(clipped, dual.float())
    return per_token, clipped


def ppo_clip_loss(logp, old, advantages, batch, algo):
    """PPO-clip (Schulman et al. 2017) per token, as GRPO uses it: r_t = pi/pi_old,
    max(-A r_t, -A clip(r_t, 1 - clip, 1 + clip_high)); ``clip: null`` leaves -A r_t
    (ReLIFT); ``dual_clip: c`` bounds a negative-advantage token's loss by -A c."""
    per_token, clipped = _clipped(_ratio(logp - old, algo), advantages, algo)
    return per_token, {"clipfrac": clipped}


def _row_mean(values: torch.Tensor, batch) -> torch.Tensor:
    """Each token's sequence mean of ``values`` (over the tokens of its row that count)."""
    n = int(batch.row.max()) + 1 if batch.row.numel() else 0
    w = batch.weight
    sums = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(
        0, batch.row, torch.where(w > 0, values * w, 0.0))
    counts = torch.zeros(n, dtype=w.dtype, device=w.device).index_add(0, batch.row, w)
    return (sums / counts.clamp(min=1.0))[batch.row]


def gspo_loss(logp, old, advantages, batch, algo):
    """GSPO (Zheng et al. 2025): one ratio per sequence, s_i = exp(mean_t log pi/pi_old),
    clipped like PPO's (the paper's clip is ~3e-4 / 4e-4). Per token the ratio is
    sg(s_i) * pi(y_t) / sg(pi(y_t)): its value is s_i, its gradient s_i * grad log pi(y_t)
    (the paper's GSPO-token form, equal to GSPO when advantages are per sequence)."""
    seq_log_ratio = _row_mean((logp - old).detach(), batch)
    per_token, clipped = _clipped(_ratio(logp - logp.detach() + seq_log_ratio, algo),
                                  advantages, algo)
    return per_token, {"clipfrac": clipped}


POLICY_LOSSES = {"ppo_clip": "workers.learner.losses:ppo_clip_loss",
                 "gspo": "workers.learner.losses:gspo_loss"}


def policy_loss(name: str):
    from core.registry import resolve

    return resolve(name, "algorithm.policy_loss", aliases=POLICY_LOSSES)


def policy_gradient_loss(fn, logp: torch.Tensor, batch, algo
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The RL term per token: the policy loss ``fn`` and the optional k3 KL. (The entropy
    bonus is a token mean of its own, added by the learner: ``entropy_bonus``.)

    Returns the per-token loss [N] and per-token diagnostics (weighted by the caller).
    Tokens without a behaviour log-prob (NaN) are on-policy: their ratio is 1.

    ``algo.tis_cap`` (truncated importance sampling, for one optimizer step per update): the
    ratio is taken to the learner's own log-probs before the step (the proximal policy:
    ``logp`` detached, so ratio 1 and the clip inactive) and each token's loss is weighted by
    ``min(pi_prox / pi_behaviour, tis_cap)``, detached — an importance weight for rollouts
    sampled by older weights (or by an engine whose numerics differ), truncated to bound its
    variance. Without it the ratio is to the behaviour log-probs themselves and the clip bounds
    how far a stale token can pull. ``logprob_diff`` (|log pi_prox - log pi_behaviour|) is the
    engine/learner mismatch either way.
    """
    prox = logp.detach()
    behaviour = torch.where(torch.isnan(batch.old_logprobs), prox, batch.old_logprobs)
    old = prox if algo.tis_cap is not None else behaviour
    per_token, diag = fn(logp, old, batch.advantages, batch, algo)
    if per_token.shape != logp.shape:
        raise ValueError(f"algorithm.policy_loss {algo.policy_loss!r} returned a loss of shape "
                         f"{tuple(per_token.shape)}, not one per token {tuple(logp.shape)}")
    diag = dict(diag, logprob_diff=(prox - behaviour).abs())
    if algo.tis_cap is not None:
        rho = torch.exp(prox - behaviour)
        weight = rho.clamp(max=algo.tis_cap)
        per_token = per_token * weight
        diag["tis_weight"], diag["tis_truncated"] = weight, (rho > algo.tis_cap).float()
    if algo.kl:
        # as verl's low_var_kl: exp stays finite, so its gradient too
        d = (batch.ref_logprobs - logp).clamp(-20.0, 20.0)
        kl = torch.exp(d) - d - 1.0  # k3 estimator, >= 0
        if algo.kl_clamp:
            kl = kl.clamp(max=algo.kl_clamp)
        per_token = per_token + algo.kl * kl
        diag["kl"] = kl.detach()
    return per_token, diag


def entropy_bonus(entropy: torch.Tensor, batch, coef: float, total_tokens: float):
    """-coef * the token mean of the entropy over the global batch (this micro-batch's share):
    a token mean whatever ``loss_agg`` the loss uses, as LUFFY's and ReLIFT's code take it."""
    return -coef * aggregate(entropy, batch, "token_mean", total_tokens, 1.0)


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
