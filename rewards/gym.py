"""reasoning-gym's own scorers as a verifier (records from ``orchestrator.data:ReasoningGym``).

Not ``rewards/reasoning_gym.py``: a module of that name would shadow the library it imports.
"""

from __future__ import annotations

import functools


@functools.cache
def _scorer(task: str):
    """The task's ``score_answer`` (reasoning-gym builds a dataset of it to hand it out)."""
    try:
        from reasoning_gym import get_score_answer_fn
    except ImportError:
        raise ImportError("rewards.gym needs reasoning-gym: pip install 'braid-rl[gym]' "
                          "(make setup installs it)") from None
    return get_score_answer_fn(task)


def reasoning_gym(prompts, completions, task, metadata, answer=None, **_):
    """The task's own score of the completion's last ``<answer>...</answer>`` (reasoning-gym's
    ``extract_answer``; none: the scorer gets None, 0.0). Scores may be partial (0..1), as the
    task's scorer gives them; the task is found by the record's ``task`` field.

    >>> meta = {"source_dataset": "spell_backward", "word": "sun"}
    >>> reasoning_gym(["Spell sun backward"] * 3,
    ...               ["<answer>nus</answer>", "<answer>sun</answer>", "nus"],
    ...               task=["spell_backward"] * 3, metadata=[meta] * 3, answer=["nus"] * 3)
    [1.0, 0.333..., 0.0]
    """
    from reasoning_gym.utils import extract_answer

    answer = answer if answer is not None else [None] * len(completions)
    out: list[float | None] = []
    for q, text, name, meta, ans in zip(prompts, completions, task, metadata, answer):
        entry = {"question": q, "answer": ans, "metadata": meta}
        out.append(float(_scorer(name)(extract_answer(text or ""), entry)))
    return out
