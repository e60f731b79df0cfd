"""Advantage estimators for outcome rewards: one scalar per sample, every token of the sample
gets it. Pure Python over small lists; the controller runs them (``orchestrator/updates.py``).

An estimator is a function named in ``algorithm.advantage`` — a built-in name below or an
import path ``module:function`` — with the signature

    estimator(rewards: list[float], groups: list[int], lengths: list[int], algo) -> list[float]

``rewards[i]`` is sample i's reward, ``groups[i]`` the prompt it answers (the samples of one
prompt form its group: the engine's samples and, under LUFFY, the demonstration),
``lengths[i]`` its completion tokens, ``algo`` the recipe's ``algorithm`` section. It returns
one advantage per sample. docs/algorithms.md gives each one's formula and source.
"""

from __future__ import annotations

import math

EPS = 1e-6


def _groups(groups: list[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        out.setdefault(g, []).append(i)
    return out


def group_centered(rewards: list[float], groups: list[int], std_normalize: bool = True,
                   eps: float = EPS) -> list[float]:
    """(r - mean(group)) / (std(group) + eps), std the sample std; without ``std_normalize``
    the numerator alone. A group of one sample has mean 0 and std 1 (as verl): its advantage
    is its reward — the REINFORCE term — not 0.

    >>> [round(a, 4) for a in group_centered([1, 0, 0, 0], [0, 0, 1, 1])]
    [0.7071, -0.7071, 0.0, 0.0]
    """
    adv = [0.0] * len(rewards)
    for members in _groups(groups).values():
        rs = [rewards[i] for i in members]
        if len(rs) == 1:
            mean, std = 0.0, 1.0
        else:
            mean = sum(rs) / len(rs)
            std = math.sqrt(sum((r - mean) ** 2 for r in rs) / (len(rs) - 1))
        for i in members:
            adv[i] = (rewards[i] - mean) / (std + eps) if std_normalize else rewards[i] - mean
    return adv


def grpo(rewards, groups, lengths, algo) -> list[float]:
    """GRPO (DeepSeekMath, Shao et al. 2024): A_i = (r_i - mean_G r) / (std_G r + eps); with
    ``algorithm.std_normalize: false``, r_i - mean_G r."""
    return group_centered(rewards, groups, algo.std_normalize)


def drgrpo(rewards, groups, lengths, algo) -> list[float]:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): A_i = r_i - mean_G r,
    no std division (pair it with ``loss_agg: seq_mean_token_sum_norm``)."""
    return group_centered(rewards, groups, std_normalize=False)


def rloo(rewards, groups, lengths, algo) -> list[float]:
    """RLOO (Ahmadian et al. 2024): A_i = r_i - mean of the *other* samples of its group
    = G/(G-1) (r_i - mean_G r). A group of one keeps its reward (as verl)."""
    adv = [0.0] * len(rewards)
    for members in _groups(groups).values():
        n = len(members)
        total = sum(rewards[i] for i in members)
        for i in members:
            adv[i] = rewards[i] - (total - rewards[i]) / (n - 1) if n > 1 else rewards[i]
    return adv


def _whiten(values: list[float], lengths: list[int], eps: float = 1e-8) -> list[float]:
    """Whitened over the batch's *tokens* (verl's masked_whiten): each sample's value counts
    once per completion token; mean and unbiased variance over those tokens."""
    w = [max(int(n), 0) for n in lengths]
    total = sum(w)
    if total < 2:
        return [0.0 for _ in values]
    mean = sum(v * n for v, n in zip(values, w)) / total
    var = sum(n * (v - mean) ** 2 for v, n in zip(values, w)) / (total - 1)
    return [(v - mean) / math.sqrt(var + eps) for v in values]


def reinforce_pp(rewards, groups, lengths, algo) -> list[float]:
    """REINFORCE++ (Hu 2025), outcome reward, gamma 1: every token's return is the sample's
    reward; advantages are the returns whitened over the global batch's tokens. No group
    baseline: works with ``sampling.n: 1``."""
    return _whiten(list(map(float, rewards)), lengths)


def reinforce_pp_baseline(rewards, groups, lengths, algo) -> list[float]:
    """REINFORCE++-baseline (Hu 2025): r_i - mean_G r (the group baseline, a group of one keeps
    its reward), then whitened over the global batch's tokens."""
    return _whiten(group_centered(rewards, groups, std_normalize=False), lengths)


def _gae_one(r: float, v: list[float], g: float, lam: float) -> list[float]:
    adv = [0.0] * len(v)
    last = 0.0
    for t in reversed(range(len(v))):
        nxt = v[t + 1] if t + 1 < len(v) else 0.0
        delta = (r if t == len(v) - 1 else 0.0) + g * nxt - v[t]
        last = delta + g * lam * last
        adv[t] = last
    return adv


def gae(rewards: list[float], values: list[list[float]], algo,
        masks: list | None = None) -> tuple[list, list]:
    """GAE (Schulman et al. 2016) for outcome rewards: the reward arrives with the last token,
    V after the last token is 0. Per token t of a sample:

        delta_t = r_t + gamma V_{t+1} - V_t,   A_t = sum_k (gamma lambda)^k delta_{t+k},
        R_t = A_t + V_t  (the critic's target)

    ``values[i]`` is the critic's V(s_t) for each completion token of sample i. ``masks[i]``
    (a multi-turn trajectory's loss mask, or None): GAE runs over the policy's tokens alone,
    back to back — the environment's tokens are not the policy's steps — and they get advantage
    0 and return V (masked out of both losses anyway). Advantages are then whitened over the
    batch's policy tokens unless ``algo.gae_whiten`` is False (verl whitens). Returns
    (advantages, returns), each a per-token list per sample.
    """
    g, lam = algo.gamma, algo.lam
    advs, rets = [], []
    for r, v, m in zip(rewards, values, masks or [None] * len(values)):
        keep = [t for t in range(len(v)) if m is None or m[t]]
        adv = [0.0] * len(v)
        for t, a in zip(keep, _gae_one(r, [v[t] for t in keep], g, lam)):
            adv[t] = a
        advs.append(adv)
        rets.append([a + x for a, x in zip(adv, v)])
    if algo.gae_whiten:
        masks = masks or [None] * len(advs)
        flat = [a for adv, m in zip(advs, masks) for t, a in enumerate(adv) if m is None or m[t]]
        if len(flat) > 1:
            mean = sum(flat) / len(flat)
            std = math.sqrt(sum((a - mean) ** 2 for a in flat) / (len(flat) - 1) + 1e-8)
            advs = [[(a - mean) / std if m is None or m[t] else 0.0 for t, a in enumerate(adv)]
                    for adv, m in zip(advs, masks)]
    return advs, rets


ADVANTAGES = {name: f"orchestrator.advantages:{name}" for name in
              ("grpo", "drgrpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")}
# estimators whose baseline is the group: with one sample per prompt they carry no signal
GROUP_BASELINE = {"grpo", "drgrpo", "rloo", "reinforce_pp_baseline"}


def estimator(name: str):
    from core.registry import resolve

    return resolve(name, "algorithm.advantage", aliases=ADVANTAGES)


def advantages(fn, rewards: list[float], groups: list[int], lengths: list[int], algo,
               name: str = "") -> list[float]:
    """Run an estimator and check what it returns: one finite number per sample."""
    out = list(fn(rewards, groups, lengths, algo))
    if len(out) != len(rewards):
        raise ValueError(f"algorithm.advantage {name!r} returned {len(out)} advantages for "
                         f"{len(rewards)} samples")
    bad = [i for i, a in enumerate(out) if not math.isfinite(float(a))]
    if bad:
        raise ValueError(f"algorithm.advantage {name!r} returned a non-finite advantage for "
                         f"sample {bad[0]} ({out[bad[0]]!r}; {len(bad)} in all)")
    return [float(a) for a in out]
