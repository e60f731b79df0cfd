"""Shape rewards: the reasoning/answer format, and DAPO's soft penalty for overlong answers."""

from __future__ import annotations

import os
import re

_TAG = r"</?(?:think|answer)>"
_BODY = rf"(?:(?!{_TAG}).)*"  # anything but another tag
_FORMAT = re.compile(rf"\s*<think>{_BODY}</think>\s*<answer>{_BODY}</answer>\s*", re.S)


def think_answer_format(prompts, completions, **_) -> list[float | None]:
    """1.0 when the completion is ``<think>...</think>`` then ``<answer>...</answer>`` and nothing
    else (whitespace around the blocks is fine, tags inside them are not), else 0.0.

    When the prompt ends with ``<think>`` (chat templates that open the reasoning block for the
    model), the completion is read as if it started with it.

    >>> think_answer_format(["q"] * 4, ["<think>a</think>\\n<answer>b</answer>\\n",
    ...                                 "<think>a</think><answer>b</answer> more",
    ...                                 "<answer>b</answer>",
    ...                                 "<think>a</think><answer>b</answer><answer>c</answer>"])
    [1.0, 0.0, 0.0, 0.0]
    >>> think_answer_format(["Solve it.<think>\\n"], ["a</think><answer>b</answer>"])
    [1.0]
    """
    prompts = list(prompts) if prompts is not None else []
    out: list[float | None] = []
    for i, text in enumerate(completions):
        if not isinstance(text, str):
            out.append(0.0)
            continue
        prompt = prompts[i] if i < len(prompts) else None
        if isinstance(prompt, str) and prompt.rstrip().endswith("<think>"):
            text = "<think>" + text
        out.append(1.0 if _FORMAT.fullmatch(text) else 0.0)
    return out


class OverlongPenalty:
    """Verifier factory: DAPO's soft overlong punishment, a reward in [-1, 0].

    With ``L`` the completion's length, ``M = max_tokens`` and ``B = buffer``: 0 for
    ``L <= M - B``, ``(M - B - L) / B`` for ``M - B < L <= M`` (falling linearly to -1), and -1
    beyond ``M``. ``L`` counts tokens of ``tokenizer`` (a Hugging Face tokenizer path or name,
    loaded once, on first use, without special tokens) when given, and **characters** otherwise
    (verifiers see only text: set ``max_tokens``/``buffer`` in characters then).

    Recipe: ``{fn: "rewards.format:OverlongPenalty", args: {max_tokens: 4096, buffer: 512,
    tokenizer: <model path>}, weight: 1.0}``.

    >>> penalty = OverlongPenalty(max_tokens=10, buffer=4)
    >>> penalty(["q"] * 5, ["x" * 6, "x" * 7, "x" * 8, "x" * 10, "x" * 11])
    [0.0, -0.25, -0.5, -1.0, -1.0]
    """

    def __init__(self, max_tokens: int, buffer: int, tokenizer: str | None = None):
        if not 0 < buffer <= max_tokens:
            raise ValueError(f"need 0 < buffer <= max_tokens, got {buffer=} {max_tokens=}")
        self.max_tokens, self.buffer, self.tokenizer = max_tokens, buffer, tokenizer
        self._tok = None

    def length(self, text: str) -> int:
        if self.tokenizer is None:
            return len(text)
        if self._tok is None:
            self._tok = _load_tokenizer(self.tokenizer)
        return self._tok(text)

    def penalty(self, length: int) -> float:
        free = self.max_tokens - self.buffer
        if length <= free:
            return 0.0
        if length <= self.max_tokens:
            return (free - length) / self.buffer
        return -1.0

    def __call__(self, prompts, completions, **_) -> list[float | None]:
        return [self.penalty(self.length(t)) if isinstance(t, str) else None
                for t in completions]


def _load_tokenizer(path: str):
    """A token counter: the folder's ``tokenizer.json`` through ``tokenizers`` when there is one
    (light), else transformers' ``AutoTokenizer`` (any name or path it accepts)."""
    file = os.path.join(path, "tokenizer.json")
    if os.path.isfile(file):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(file)
        return lambda text: len(tok.encode(text, add_special_tokens=False).ids)
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(path)
    return lambda text: len(auto.encode(text, add_special_tokens=False))
