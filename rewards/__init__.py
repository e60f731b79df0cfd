"""Verifiers: plain callables ``(prompts, completions, **fields) -> list[float | None]``."""

from __future__ import annotations

import numbers
from math import isfinite  # not `import math`: the submodule rewards.math would shadow it
from typing import Any


def check_rewards(out: Any, n: int) -> tuple[list[float | None] | None, str]:
    """A verifier's output as rewards — one finite number or None per completion — and "", or
    None and why it breaks that contract.

    >>> check_rewards([1, None, 0.5], 3)
    ([1.0, None, 0.5], '')
    >>> check_rewards([1.0], 2)
    (None, 'returned 1 rewards for 2 completions')
    """
    if not isinstance(out, (list, tuple)):
        return None, f"returned a {type(out).__name__}, not a list of {n} rewards"
    if len(out) != n:
        return None, f"returned {len(out)} rewards for {n} completions"
    res: list[float | None] = []
    for v in out:
        if v is None:
            res.append(None)
        elif isinstance(v, numbers.Real) and not isinstance(v, bool) and isfinite(v):
            res.append(float(v))
        else:
            return None, f"returned {v!r}, not a finite number or None"
    return res, ""


def as_rewards(out: Any, n: int) -> list[float | None] | None:
    """:func:`check_rewards` without the reason.

    >>> as_rewards([1, None, 0.5], 3)
    [1.0, None, 0.5]
    >>> as_rewards([1.0, float("nan")], 2) is None, as_rewards("1", 1) is None
    (True, True)
    """
    return check_rewards(out, n)[0]
