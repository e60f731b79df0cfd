"""Every verifier keeps the contract (one float or None per completion, never an exception), and
the math, format and composition verifiers score what they should."""

from __future__ import annotations

import threading

import pytest

from rewards.compose import Weighted
from rewards.format import OverlongPenalty, think_answer_format
from rewards.math import (
    NumericMatch,
    answer_is,
    exact_match,
    extract_final,
    math_answer,
    numeric_match,
)
from rewards.sandbox import CodeTests

VERIFIERS = {
    "math_answer": lambda: math_answer,
    "exact_match": lambda: exact_match,
    "numeric_match": lambda: numeric_match,
    "NumericMatch": lambda: NumericMatch(rel_tol=1e-3),
    "answer_is": lambda: answer_is,
    "think_answer_format": lambda: think_answer_format,
    "OverlongPenalty": lambda: OverlongPenalty(max_tokens=100, buffer=20),
    "Weighted": lambda: Weighted([{"fn": "rewards.math:math_answer"},
                                  {"fn": "rewards.format:think_answer_format", "weight": 0.1}]),
    "CodeTests": lambda: CodeTests(cpu_s=1, wall_s=3),
}
TESTS = [{"input": "1\n", "output": "2\n"}]
LONG = "Let me think. " * 20_000 + "\\boxed{42}"
ODD_COMPLETIONS = [None, 42, "", " ", "\x00", "\udcff", "}{\\boxed{", "<think></think>",
                   "```python\n", "\\frac{1}{0}", "1e999999", "9" * 5000, "nan", "-inf"]
ODD_ANSWERS = [None, 42, "", "}{", [1, 2], {"a": 1}, "\\boxed{", "1/0", "1e999999", "nan", 3.5,
               True, "x" * 100, "\udcff"]
ODD_TESTS = [None, "not json", [], [{"input": 1}], {"inputs": ["1"]}, TESTS, [{"output": "x"}],
             "[]", 7, [None], {"inputs": ["1\n"], "outputs": ["2\n"]}, TESTS, TESTS, TESTS]


@pytest.fixture(params=sorted(VERIFIERS), scope="module")
def verifier(request):
    return VERIFIERS[request.param]()


def _check(out, n):
    assert isinstance(out, list) and len(out) == n
    assert all(v is None or (type(v) is float and v == v) for v in out), out


def _call(fn, completions, answers=None, tests=None):
    n = len(completions)
    return fn(["prompt"] * n, completions, answer=answers or ["42"] * n,
              tests=tests or [TESTS] * n)


def test_contract_normal_and_empty_batch(verifier):
    out = _call(verifier, ["<think>x</think><answer>\\boxed{42}</answer>", "print(2)"])
    _check(out, 2)
    assert verifier([], [], answer=[], tests=[]) == []


def test_contract_unicode_and_long_strings(verifier):
    completions = ["答案是 \\boxed{42} 🙂", "<think>ü</think><answer>४२</answer>", LONG,
                   "```python\nprint('é' * 10**6)\n```"]
    _check(_call(verifier, completions, answers=["42", "四十二", "42", "é"]), 4)


def test_contract_odd_input_never_raises(verifier):
    n = len(ODD_COMPLETIONS)
    _check(_call(verifier, ODD_COMPLETIONS, ODD_ANSWERS, ODD_TESTS), n)
    # mismatched optional fields and unexpected extra fields are tolerated too
    _check(verifier(["p"], ["1"], answer=["1"], tests=[TESTS], extra=[object()]), 1)


# --- math -------------------------------------------------------------------------------------

@pytest.mark.parametrize("completion, gold, want", [
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("The answer is $0.5$", "\\frac{1}{2}", 1.0),
    ("\\boxed{1/2}", "$\\frac12$", 1.0),
    ("so x = \\boxed{\\sqrt{2}}", "\\sqrt 2", 1.0),
    ("\\boxed{2 \\cdot \\pi}", "2\\pi", 1.0),
    ("\\boxed{\\{1, 2\\}}", "\\{2, 1\\}", 1.0),
    ("\\boxed{x^2 + 2x + 1}", "(x+1)^2", 1.0),
    ("\\boxed{0.49}", "\\frac{1}{2}", 0.0),
    ("<think>surely \\boxed{3}</think> It is \\boxed{5}.", "5", 1.0),
    ("<think>surely \\boxed{3}</think> It is \\boxed{5}.", "3", 0.0),
    ("<think>1/2?</think><answer>0.5</answer>", "1/2", 1.0),
    ("no answer here", "7", 0.0),
    ("\\boxed{7}", None, None),
])
def test_math_answer(completion, gold, want):
    assert math_answer(["q"], [completion], answer=[gold]) == [want]


def test_math_answer_outside_the_main_thread():
    """math_verify's SIGALRM timeouts would raise there; we switch them off instead."""
    box = {}
    t = threading.Thread(target=lambda: box.update(
        out=math_answer(["q"] * 2, ["\\boxed{\\frac{2}{4}}", "\\boxed{3}"], answer=["0.5"] * 2)))
    t.start()
    t.join(60)
    assert box["out"] == [1.0, 0.0]


@pytest.mark.parametrize("text, want", [
    ("\\boxed{\\frac{a}{b}}", "\\frac{a}{b}"),
    ("x \\boxed{{{1}}+\\left\\{2\\right\\}} y", "{{1}}+\\left\\{2\\right\\}"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{unfinished", "\\boxed{unfinished"),
    ("\\boxed{ok} then \\boxed{cut", "ok"),
    ("<think>\\boxed{1}</think>\n  The result: 9  ", "The result: 9"),
    ("<think>a</think><answer>\n b </answer>", "b"),
    ("<think>a</think>", ""),
    ("line one\n\nlast line\n\n", "last line"),
    ("<answer>x</answer>", "x"),
])
def test_extract_final(text, want):
    assert extract_final(text) == want


def test_exact_and_numeric_match():
    assert exact_match(["q"] * 3, ["  a   b ", "<think>x</think>A B", "ab"],
                       answer=["a b", "A B", "a b"]) == [1.0, 1.0, 0.0]
    got = numeric_match(["q"] * 8, ["1,234,567", "\\boxed{-3/4}", "\\dfrac{6}{8}", "1e-3",
                                    "$12$.", "answer: 1,2", "0.3333", "x"],
                        answer=["1234567", "-0.75", "3/4", "0.001", 12, "2", "1/3", "1"])
    assert got == [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert NumericMatch(rel_tol=1e-3)(["q"], ["0.3333"], answer=["1/3"]) == [1.0]


# --- format -----------------------------------------------------------------------------------

@pytest.mark.parametrize("completion, want", [
    ("<think>a</think><answer>b</answer>", 1.0),
    ("  <think>\nmulti\nline\n</think>\n\n<answer>\n42\n</answer>\n ", 1.0),
    ("<think>a</think><answer>b</answer>trailing", 0.0),
    ("lead<think>a</think><answer>b</answer>", 0.0),
    ("<think>a</think>between<answer>b</answer>", 0.0),
    ("<think>a<think>b</think><answer>c</answer>", 0.0),
    ("<answer>b</answer><think>a</think>", 0.0),
    ("<think>a</think><answer>b", 0.0),
    ("", 0.0),
])
def test_think_answer_format(completion, want):
    assert think_answer_format(["q"], [completion]) == [want]


def test_overlong_penalty_boundaries():
    p = OverlongPenalty(max_tokens=100, buffer=20)
    lengths = [0, 80, 81, 90, 99, 100, 101, 10_000]
    assert p(["q"] * 8, ["x" * n for n in lengths]) == \
        [0.0, 0.0, -0.05, -0.5, -0.95, -1.0, -1.0, -1.0]
    assert OverlongPenalty(10, 10)(["q"] * 2, ["", "x" * 5]) == [0.0, -0.5]
    for bad in ((10, 0), (10, 11), (10, -1)):
        with pytest.raises(ValueError):
            OverlongPenalty(*bad)


def test_overlong_penalty_counts_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    p = OverlongPenalty(max_tokens=8, buffer=4, tokenizer=str(tmp_path / "tok"))
    assert p.length("a b  a") == 3  # words here, not characters
    assert p(["q"] * 3, ["a " * 4, "a b " * 3, "b " * 9]) == [0.0, -0.5, -1.0]


# --- composition ------------------------------------------------------------------------------

def test_weighted_sums_and_propagates_none():
    w = Weighted([{"fn": "rewards.math:exact_match", "weight": 2.0},
                  {"fn": "rewards.format:OverlongPenalty", "args": {"max_tokens": 4, "buffer": 2}},
                  "rewards.format:think_answer_format"])
    got = w(["q"] * 3, ["4", "44444", "<think>.</think><answer>5</answer>"],
            answer=["4", "44444", None])
    assert got == [2.0, 1.0, None]
    zero = Weighted(w.terms, on_failure="zero")
    # exact_match None -> 0, OverlongPenalty -1 (34 characters), think_answer_format 1
    assert zero(["q"], ["<think>.</think><answer>5</answer>"], answer=[None]) == [0.0]


def test_weighted_failing_term(tmp_path, monkeypatch):
    (tmp_path / "bad_terms.py").write_text(
        "def boom(prompts, completions, **_):\n    raise RuntimeError('x')\n"
        "def short(prompts, completions, **_):\n    return [1.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for bad in ("bad_terms:boom", "bad_terms:short"):
        terms = ["rewards.format:think_answer_format", {"fn": bad, "weight": 3}]
        assert Weighted(terms)(["q"] * 2, ["a", "b"]) == [None, None]
        assert Weighted(terms, on_failure="zero")(["q"] * 2, ["a", "b"]) == [0.0, 0.0]


def test_weighted_bad_spec():
    from core.errors import RecipeError

    with pytest.raises(RecipeError, match="Weighted.terms.0: no module named"):
        Weighted([{"fn": "no_such_module:fn"}])
    with pytest.raises(ValueError, match="unknown keys"):
        Weighted([{"fn": "rewards.math:exact_match", "wieght": 1}])
    with pytest.raises(ValueError, match="on_failure"):
        Weighted(["rewards.math:exact_match"], on_failure="ignore")


def test_factories_pass_the_reward_workers_arg_check():
    from workers.reward import RuleRewardWorker

    args = RuleRewardWorker.check_args({"verifiers": [
        "rewards.math:numeric_match",
        {"fn": "rewards.math:NumericMatch", "args": {"rel_tol": 1e-3}},
        {"fn": "rewards.format:OverlongPenalty", "args": {"max_tokens": 10, "buffer": 2}},
        {"fn": "rewards.compose:Weighted",
         "args": {"terms": ["rewards.math:math_answer"], "on_failure": "zero"}},
        {"fn": "rewards.sandbox:CodeTests", "args": {"cpu_s": 1, "wall_s": 2}},
    ]}, "roles.reward.args")
    assert len(args.verifiers) == 5
