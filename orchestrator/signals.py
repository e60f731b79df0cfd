"""What a step's rollouts say: per-prompt successes and rewards (advantages: advantages.py).

Pure Python over small lists; schedules read these, never the rollouts themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PromptStats:
    id: str
    n: int
    n_correct: int           # samples with reward >= success_threshold
    rewards: list[float]
    mean_length: float
    has_demo: bool


@dataclass
class StepSignals:
    step: int
    prompts: list[PromptStats]
    reward_mean: float
    pass_rate: float               # fraction of samples that succeeded
    zero_success_frac: float       # prompts no sample solved
    zero_variance_frac: float      # groups whose rewards are all equal: no GRPO gradient
    unscored: int                  # samples a verifier could not score
    probes: dict[str, float] = field(default_factory=dict)


def step_signals(step: int, records: list[dict], prompt_index: list[int],
                 rewards: list[float | None], lengths: list[int],
                 success_threshold: float = 1.0, has_demo=None) -> StepSignals:
    """``has_demo(id)`` says whether a demonstration is known (default: the record has one)."""
    per: dict[int, list[int]] = {}
    for i, p in enumerate(prompt_index):
        per.setdefault(p, []).append(i)
    prompts = []
    for p, members in sorted(per.items()):
        rs = [rewards[i] if rewards[i] is not None else 0.0 for i in members]
        prompts.append(PromptStats(
            id=records[p]["id"], n=len(members),
            n_correct=sum(r >= success_threshold for r in rs), rewards=rs,
            mean_length=sum(lengths[i] for i in members) / len(members),
            has_demo=has_demo(records[p]["id"]) if has_demo else
            bool(records[p].get("demonstration"))))
    scored = [r if r is not None else 0.0 for r in rewards]
    n = max(len(scored), 1)
    return StepSignals(
        step=step, prompts=prompts, reward_mean=sum(scored) / n,
        pass_rate=sum(r >= success_threshold for r in scored) / n,
        zero_success_frac=sum(p.n_correct == 0 for p in prompts) / max(len(prompts), 1),
        zero_variance_frac=sum(len(set(p.rewards)) == 1 for p in prompts) / max(len(prompts), 1),
        unscored=sum(r is None for r in rewards))


def empty_signals(step: int) -> StepSignals:
    """Signals of a step that generated nothing (e.g. an SFT-only step)."""
    return StepSignals(step=step, prompts=[], reward_mean=0.0, pass_rate=0.0,
                       zero_success_frac=0.0, zero_variance_frac=0.0, unscored=0)


def eval_rates(k: int | None, prompt_index: list[int], rewards: list[float | None],
               buckets: list[str] | None = None, success_threshold: float = 1.0) -> dict:
    """Held-out metrics of one eval pass, overall and per bucket (``buckets[p]`` names prompt
    p's): greedy accuracy (``k`` None: one sample per prompt), or, for k samples per prompt,
    avg@k — the mean over prompts of the fraction of its samples that are correct — and
    pass@k — the fraction of prompts with at least one correct sample.

    >>> eval_rates(None, [0, 1, 2], [1.0, 0.0, None])
    {'eval/accuracy': 0.333...}
    >>> r = eval_rates(2, [0, 0, 1, 1], [1.0, 0.0, 0.0, 0.0], ["easy", "hard"])
    >>> r["eval/avg@2"], r["eval/pass@2"], r["eval/avg@2/easy"], r["eval/pass@2/hard"]
    (0.25, 0.5, 0.5, 0.0)
    """
    per_prompt: dict[int, list[float]] = {}
    for p, r in zip(prompt_index, rewards):
        per_prompt.setdefault(p, []).append(1.0 if (r or 0.0) >= success_threshold else 0.0)
    groups = {"": sorted(per_prompt)}
    for p in sorted(per_prompt) if buckets else ():
        groups.setdefault(f"/{buckets[p]}", []).append(p)
    out = {}
    for suffix, ps in sorted(groups.items()):
        mean = sum(sum(per_prompt[p]) / len(per_prompt[p]) for p in ps) / len(ps)
        if k is None:
            out[f"eval/accuracy{suffix}"] = mean
        else:
            out[f"eval/avg@{k}{suffix}"] = mean
            out[f"eval/pass@{k}{suffix}"] = sum(max(per_prompt[p]) for p in ps) / len(ps)
    return out
