"""Learning-rate schedule and PPO mini-batches of a learner update. Pure Python."""

from __future__ import annotations

import math
import random


def lr_factor(algo, step: int, total_steps: int) -> float:
    """Multiplier of the learning rate at run step ``step`` (1-based): linear warm-up over
    ``algo.lr_warmup_steps`` steps, then ``constant``, or ``linear`` or ``cosine`` decay from
    1 at the first step after warm-up to ``algo.lr_min_ratio`` at ``total_steps``.

    >>> from types import SimpleNamespace as A
    >>> a = A(lr_warmup_steps=2, lr_schedule="cosine", lr_min_ratio=0.0)
    >>> [round(lr_factor(a, s, 6), 3) for s in range(1, 7)]
    [0.5, 1.0, 1.0, 0.75, 0.25, 0.0]
    >>> lr_factor(A(lr_warmup_steps=0, lr_schedule="linear", lr_min_ratio=0.1), 3, 5)
    0.55
    """
    warmup = algo.lr_warmup_steps
    if step <= warmup:
        return step / warmup
    if algo.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, max(0.0, (step - warmup - 1) / max(1, total_steps - warmup - 1)))
    shape = 1.0 - progress if algo.lr_schedule == "linear" else \
        0.5 * (1.0 + math.cos(math.pi * progress))
    return algo.lr_min_ratio + (1.0 - algo.lr_min_ratio) * shape


def mini_batches(terms: list, n_mini: int, epochs: int, seed) -> list[list]:
    """The terms of each optimizer step: ``epochs`` passes, each over a fresh shuffle of every
    term's rows cut into ``n_mini`` parts (a step gets part k of every term; a term with
    fewer rows than parts sits out some steps). ``[terms]`` itself for 1 and 1. Each step's
    terms are normalised over their own rows by the learner, so every step is a full-size
    update on its part. The shuffle depends only on ``seed`` and the epoch: identical on
    every learner rank.

    >>> from workers.learner.terms import SFT
    >>> t = SFT(prompts=[[1], [2], [3], [4]], completions=[[5]] * 4)
    >>> steps = mini_batches([t], 2, 1, seed=0)
    >>> sorted(p for s in steps for p in s[0].prompts)
    [[1], [2], [3], [4]]
    >>> len(mini_batches([t], 2, 3, seed=0)), mini_batches([t], 1, 1, seed=0) == [[t]]
    (6, True)
    """
    if n_mini == 1 and epochs == 1:
        return [terms]
    out = []
    for epoch in range(epochs):
        rng = random.Random(repr((seed, epoch)))
        parts = []
        for term in terms:
            order = list(range(len(term)))
            rng.shuffle(order)
            parts.append([order[k::n_mini] for k in range(n_mini)])
        for k in range(n_mini):
            step = [t.take(p[k]) for t, p in zip(terms, parts) if p[k]]
            if step:
                out.append(step)
    return out
