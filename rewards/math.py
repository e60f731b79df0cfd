"""Verifiers for math answers: symbolic (math_verify), exact and numeric.

All of them judge the *final answer* of a completion (see :func:`extract_final`) against the
record's ``answer`` field. A sample whose gold answer cannot be read scores None; a completion
without a readable answer is simply wrong (0.0).
"""

from __future__ import annotations

import math
import re
import threading

_TAIL = 4000  # characters of the completion math_verify looks at: the answer is at the end


def _last_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` (or ``\fbox{...}``) with balanced braces."""
    for m in reversed(list(re.finditer(r"\\(?:boxed|fbox)\s*", text))[-3:]):  # last complete one
        i = m.end()
        if i < len(text) and text[i] != "{":  # \boxed 5
            arg = re.match(r"[^\s$]+", text[i:])
            return arg.group(0) if arg else None
        depth, j = 0, i
        while j < len(text):
            c = text[j]
            if c == "\\":  # an escaped brace or a command: never a group delimiter
                j += 2
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1:j]
            j += 1
    return None


def extract_final(text: str) -> str:
    r"""The final answer in a completion.

    Where the completion has a ``</think>``, only the text after the last one counts. In that
    region: the content of the last ``\boxed{...}`` (balanced braces), else of the last
    ``<answer>...</answer>``, else the whole region (after ``</think>``) or its last non-empty
    line (without ``</think>``).

    >>> extract_final(r"so $x = \boxed{\frac{1}{2}}$.")
    '\\frac{1}{2}'
    >>> extract_final(r"\boxed{\{1, 2\}} and \boxed{{a}^{2}}")
    '{a}^{2}'
    >>> extract_final("<think>maybe 3</think>\n<answer> 4 </answer>")
    '4'
    >>> extract_final("<think>hmm</think>  12")
    '12'
    >>> extract_final("First, 2+2.\nThe answer is 4")
    'The answer is 4'
    """
    if not isinstance(text, str):
        return ""
    thought = "</think>" in text
    region = text.rpartition("</think>")[2]
    boxed = _last_boxed(region)
    if boxed is not None:
        return boxed.strip()
    answers = re.findall(r"<answer>(.*?)(?:</answer>|$)", region, re.S)
    if answers:
        return answers[-1].strip()
    if thought:
        return region.strip()
    lines = [line.strip() for line in region.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _norm_ws(s: str) -> str:
    return " ".join(s.split())


def exact_match(prompts, completions, answer, **_) -> list[float | None]:
    r"""1.0 when the final answer equals the gold answer, whitespace normalised.

    >>> exact_match(["q"] * 3, [r"\boxed{x  + 1}", "<think>.</think>B", "A"],
    ...             answer=["x + 1", "B", "B"])
    [1.0, 1.0, 0.0]
    """
    out: list[float | None] = []
    for text, gold in zip(completions, answer):
        if gold is None:
            out.append(None)
            continue
        out.append(1.0 if _norm_ws(extract_final(text)) == _norm_ws(str(gold)) else 0.0)
    return out


_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?:\D|$))")
_UNSIGNED = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_NUMBER = re.compile(rf"[-+]?{_UNSIGNED}(?:\s*/\s*{_UNSIGNED})?")


def _to_number(s) -> float | None:
    r"""A float from ``42``, ``-1,234.5``, ``3/4``, ``\frac{3}{4}``, ``1e-3``, ``$7$``, ``50%``
    (as 50), or else the last number in the text; None if there is none."""
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        return float(s) if math.isfinite(s) else None
    if not isinstance(s, str):
        return None
    s = s.replace("\\!", "").replace("\\,", "").replace("{,}", ",")
    s = _THOUSANDS.sub("", _FRAC.sub(r"\1/\2", s))
    s = s.strip().strip("$").strip().rstrip(".%")
    for candidate in (s, *reversed(_NUMBER.findall(s))):
        value = _parse_number(candidate)
        if value is not None:
            return value
    return None


def _parse_number(s: str) -> float | None:
    try:
        num, slash, den = s.partition("/")
        value = float(num) / float(den) if slash else float(num)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return value if math.isfinite(value) else None


class NumericMatch:
    r"""Verifier factory: 1.0 when the final answer is numerically the gold answer, within
    ``rel_tol``/``abs_tol`` (``math.isclose``). Reads floats, fractions, ``\frac``, thousand
    separators; falls back to the last number in the final answer.

    The final answer is :func:`extract_final`'s (the last ``\boxed{}``, ``<answer>``, else the
    last line). With ``marker`` (say ``"answer is"``, case-insensitive), it is the first number
    after the marker's last occurrence, else the last number of the whole response (after any
    ``</think>``) — for models that announce the answer in words and may write more after it
    (even the marker again, say by echoing the instruction).

    Recipe: ``{fn: "rewards.math:NumericMatch", args: {rel_tol: 1e-4}}``, or the default
    instances ``rewards.math:numeric_match`` and ``rewards.math:answer_is``
    (``marker="answer is"``).

    >>> NumericMatch(rel_tol=1e-3)(["q"] * 4, ["1,000", r"\boxed{\frac{1}{3}}", "about 7", "x"],
    ...                           answer=["1000", "0.3333", 7, "2"])
    [1.0, 1.0, 1.0, 0.0]
    >>> numeric_match(["q"], ["0.5"], answer=["not a number"])
    [None]
    >>> answer_is(["q"] * 4, ["4 + 7 = 11. The answer is 11.\nHope this helps!",
    ...                       "So 3 * 4 = 12 apples.", "The answer is 5, not 6.",
    ...                       "The answer is: 9\nThe last line must be 'The answer is' ..."],
    ...           answer=["11", "12", "6", "9"])
    [1.0, 1.0, 0.0, 1.0]
    """

    def __init__(self, rel_tol: float = 1e-6, abs_tol: float = 1e-9, marker: str | None = None):
        self.rel_tol, self.abs_tol, self.marker = rel_tol, abs_tol, marker

    def _answer(self, text) -> float | None:
        if self.marker is None:
            return _to_number(extract_final(text))
        if not isinstance(text, str):
            return None
        region = _THOUSANDS.sub("", _FRAC.sub(r"\1/\2", text.rpartition("</think>")[2]))
        said = re.findall(re.escape(self.marker) + r"[\s:=*$\\(]*(" + _NUMBER.pattern + ")",
                          region, re.I)
        return _parse_number(said[-1].replace(" ", "")) if said else _to_number(region)

    def __call__(self, prompts, completions, answer, **_) -> list[float | None]:
        out: list[float | None] = []
        for text, gold in zip(completions, answer):
            want = _to_number(gold)
            if want is None:
                out.append(None)
                continue
            got = self._answer(text)
            close = got is not None and math.isclose(got, want, rel_tol=self.rel_tol,
                                                     abs_tol=self.abs_tol)
            out.append(1.0 if close else 0.0)
        return out


numeric_match = NumericMatch()
answer_is = NumericMatch(marker="answer is")


def _mv_timeout() -> int | None:
    """math_verify's timeouts use SIGALRM, which only the main thread may set."""
    return 5 if threading.current_thread() is threading.main_thread() else None


def _parse_gold(gold, parse, timeout):
    text = str(gold).strip()
    if not text:
        return []
    if "$" in text or "\\boxed" in text or "\\(" in text or "\\[" in text:
        return parse(text, parsing_timeout=timeout)
    return parse(f"${text}$", parsing_timeout=timeout) or parse(text, parsing_timeout=timeout)


def math_answer(prompts, completions, answer, **_) -> list[float | None]:
    r"""1.0 when math_verify finds the completion's answer equivalent to the gold one.

    The prediction is read from the end of the completion (after any ``</think>``) with
    math_verify's own extraction (``\boxed{}`` first), else from :func:`extract_final`. Gold
    answers may lack ``$`` delimiters. None when the gold answer cannot be parsed.

    >>> math_answer(["q"] * 3, [r"... so \boxed{\frac{1}{2}}", "<think>1/3?</think> 0.5", "2"],
    ...             answer=["0.5", r"\frac12", "3"])
    [1.0, 1.0, 0.0]
    """
    from math_verify import parse, verify

    timeout = _mv_timeout()
    out: list[float | None] = []
    for text, gold in zip(completions, answer):
        try:
            gold_parsed = _parse_gold(gold, parse, timeout) if gold is not None else []
            if not gold_parsed:
                out.append(None)
                continue
            if not isinstance(text, str):
                out.append(0.0)
                continue
            region = text.rpartition("</think>")[2][-_TAIL:]
            pred = parse(region, parsing_timeout=timeout)
            if not pred:
                final = extract_final(text)
                pred = parse(f"${final}$", parsing_timeout=timeout) if final else []
            ok = bool(pred) and verify(gold_parsed, pred, timeout_seconds=timeout)
            out.append(1.0 if ok else 0.0)
        except Exception:  # math_verify on odd input: this sample cannot be judged
            out.append(None)
    return out
