"""Verifiers: plain callables ``(prompts, completions, **fields) -> list[float | None]``."""

from __future__ import annotations

import numbers
from math import isfinite  # not `import math`: the submodule rewards.math would shadow it
from typing import Any


def as_rewards(out: Any, n: int) -> list[float | None] | None:
    """A verifier's output as rewards — one finite number or None per completion — or None
    when it breaks that contract.

    >>> as_rewards([1, None, 0.5], 3)
    [1.0, None, 0.5]
    >>> as_rewards([1.0, float("nan")], 2) is None, as_rewards("1", 1) is None
    (True, True)
    """
    if not isinstance(out, (list, tuple)) or len(out) != n:
        return None
    res: list[float | None] = []
    for v in out:
        if v is None:
            res.append(None)
        elif isinstance(v, numbers.Real) and not isinstance(v, bool) and isfinite(v):
            res.append(float(v))
        else:
            return None
    return res
