"""Verifiers for the embedded arithmetic task.

A verifier is a plain callable ``(prompts, completions, **fields) -> list[float | None]``;
``fields`` are the dataset record's other keys as lists aligned with ``completions``.
"""

from __future__ import annotations


def exact_answer(prompts, completions, answer, reverse=None, **_):
    """1.0 when the completion (read in reverse when the record says so) equals the answer.

    >>> exact_answer(["12+30="], ["24"], answer=["42"], reverse=[True])
    [1.0]
    >>> exact_answer(["1+1="], [" 2 "], answer=["2"])
    [1.0]
    >>> exact_answer(["1+1="], ["3"], answer=["2"])
    [0.0]
    """
    reverse = reverse or [False] * len(completions)
    out = []
    for text, ans, rev in zip(completions, answer, reverse):
        text = text.strip()
        out.append(1.0 if (text[::-1] if rev else text) == str(ans).strip() else 0.0)
    return out
