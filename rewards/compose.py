"""Composite verifiers: several verifiers summed with weights, reported as one reward."""

from __future__ import annotations

from typing import Any, Literal

from core.registry import resolve
from rewards import as_rewards


class Weighted:
    """Verifier factory: ``sum(weight * term)`` over sub-verifiers, per sample.

    ``terms`` are ``{fn, weight=1.0, args=None}`` like the reward worker's verifier entries
    (``fn`` an import path ``module:name``; with ``args``, a factory called once with them), or
    bare import paths. A term that raises or returns something malformed fails for the whole
    batch. A sample where any term gave None is None (``on_failure="none"``: the reward worker
    then reports it as unscored) or counts that term as 0 (``on_failure="zero"``).

    Recipe: ``{fn: "rewards.compose:Weighted", args: {terms: [{fn: "rewards.math:math_answer"},
    {fn: "rewards.format:think_answer_format", weight: 0.1}]}}``.

    >>> score = Weighted([{"fn": "rewards.math:exact_match"},
    ...                   {"fn": "rewards.format:OverlongPenalty", "weight": 0.5,
    ...                    "args": {"max_tokens": 8, "buffer": 4}}])
    >>> score(["q"] * 3, ["4", "44444444", "5"], answer=["4", "44444444", None])
    [1.0, 0.5, None]
    >>> Weighted(score.terms, on_failure="zero")(["q"], ["5"], answer=[None])
    [0.0]
    """

    def __init__(self, terms: list[dict | str], on_failure: Literal["none", "zero"] = "none"):
        if on_failure not in ("none", "zero"):
            raise ValueError(f"on_failure must be 'none' or 'zero', got {on_failure!r}")
        if not terms:
            raise ValueError("Weighted needs at least one term")
        self.terms, self.on_failure = terms, on_failure
        self._fns: list[tuple[Any, float]] = []
        for i, term in enumerate(terms):
            term = {"fn": term} if isinstance(term, str) else dict(term)
            unknown = set(term) - {"fn", "weight", "args"}
            if unknown:
                raise ValueError(f"Weighted.terms.{i}: unknown keys {sorted(unknown)}")
            fn = resolve(term["fn"], f"Weighted.terms.{i}")
            if term.get("args") is not None:
                fn = fn(**term["args"])
            if not callable(fn):
                raise ValueError(f"Weighted.terms.{i}: {term['fn']!r} is not callable")
            self._fns.append((fn, float(term.get("weight", 1.0))))

    def __call__(self, prompts, completions, **fields) -> list[float | None]:
        n = len(completions)
        total: list[float | None] = [0.0] * n
        for fn, weight in self._fns:
            try:
                out = fn(prompts, completions, **fields)
            except Exception:
                out = None
            out = as_rewards(out, n) or [None] * n
            for i, v in enumerate(out):
                if v is None and self.on_failure == "zero":
                    v = 0.0
                cur = total[i]
                total[i] = None if (v is None or cur is None) else cur + weight * float(v)
        return total
