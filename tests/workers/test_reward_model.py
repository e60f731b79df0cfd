"""Learned rewards driven in a plain process (and once under Ray): the reward model's batched,
sorted, padded, sharded scores equal an unbatched forward of each sample; the judge grades
with a vLLM engine, and samples it cannot grade score None, counted and named."""

from __future__ import annotations

import doctest
import math
import shutil

import pytest
import torch

import workers.reward_model as reward_model
from core.errors import RecipeError
from orchestrator.config import Recipe
from tests.conftest import recipe_dict
from workers.base import WorkerContext
from workers.reward_model import JudgeRewardWorker, RewardModelWorker, parse_grade
from workers.types import Rollouts, Scores

RM = "workers.reward_model:RewardModelWorker"
PROMPTS = ["1+2=", "12+30=", "(3*4)+5=", "7-2="]
COMPLETIONS = [  # per prompt: different lengths, and a repeated completion (GRPO groups do)
    ["3", "4", "3 ok", "3"],
    ["42", "41 maybe", "42", "x"],
    ["17", "seventeen", "12+5=17", "17 because 3*4 is 12 and 12+5 is 17"],
    ["5", "", "5.0", "five"],
]


def _rollouts(prompts=PROMPTS, completions=COMPLETIONS) -> Rollouts:
    idx = [p for p in range(len(prompts)) for _ in completions[p]]
    texts = [c for cs in completions for c in cs]
    n = len(texts)
    return Rollouts(idx, [[1]] * n, [[5]] * n, [[-0.1]] * n, texts, ["stop"] * n)


def _records(prompts=PROMPTS) -> list[dict]:
    return [{"id": f"p{i}", "prompt": p, "answer": str(eval(p[:-1]))}
            for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def rm_path(base_dir):
    from workers.models import TinyModelSpec, build_tiny_reward_model

    return build_tiny_reward_model(
        base_dir / "tiny-reward-model",
        TinyModelSpec(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                      max_position_embeddings=64, seed=1))


@pytest.fixture(scope="module")
def rm_recipe(tiny_model, rm_path, base_dir) -> Recipe:
    return Recipe.model_validate(recipe_dict(
        tiny_model, base_dir / "rm-run",
        **{"roles.reward": {"cls": RM, "replicas": 2, "resources": {"num_cpus": 1},
                            "args": {"model": str(rm_path)}}}))


def make_rm(recipe: Recipe, rank: int = 0, world: int = 1, **over) -> RewardModelWorker:
    args = RewardModelWorker.check_args({**recipe.roles.reward.args, "threads": 1, **over},
                                        "roles.reward.args")
    w = RewardModelWorker(WorkerContext("reward", rank, world, recipe, args))
    w.setup()
    return w


def direct_scores(path, texts: list[str], max_length: int | None = None) -> list[float]:
    """One unpadded forward per text, in order: what the worker's batching must reproduce."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    out = []
    with torch.no_grad():
        for t in texts:
            ids = tok(t).input_ids
            if max_length is not None and len(ids) > max_length:  # keep BOS and the end
                ids = ids[:1] + ids[len(ids) - max_length + 1:]
            out.append(model(torch.tensor([ids])).logits[0, 0].item())
    return out


@pytest.fixture(scope="module")
def expected(rm_path) -> list[float]:
    r, recs = _rollouts(), _records()
    return direct_scores(rm_path, [recs[p]["prompt"] + c for p, c in zip(r.prompt_index, r.texts)])


def test_reward_model_scores_equal_an_unbatched_forward(rm_recipe, expected):
    w = make_rm(rm_recipe, micro_batch_size=3)  # 16 samples: 5 micro-batches, mixed lengths
    s = w.score(_rollouts(), _records())
    assert len(s.rewards) == 16 and not s.failures and not s.failed_ids
    assert s.per_verifier["reward_model"] == s.rewards
    torch.testing.assert_close(torch.tensor(s.rewards), torch.tensor(expected),
                               rtol=0, atol=1e-5)
    # the comparison means something only if the samples score apart
    distinct = sorted(set(round(v, 6) for v in expected))
    assert len(distinct) == len(set(zip(_rollouts().prompt_index, _rollouts().texts)))
    assert min(b - a for a, b in zip(distinct, distinct[1:])) > 1e-4


def test_shards_concatenate_to_the_unsharded_scores(rm_recipe, expected):
    w = make_rm(rm_recipe, micro_batch_size=4)
    r, recs = _rollouts(), _records()
    whole = w.score(r, recs)
    for of in (2, 3, 5):
        parts = [w.score(r, recs, shard=(k, of)) for k in range(of)]
        assert sum(len(p.rewards) for p in parts) == len(r)
        assert Scores.concat(parts).rewards == pytest.approx(whole.rewards, abs=1e-6)
    # rollouts arriving as several parts (one per rollout engine) are gathered first
    halves = [Rollouts(*(getattr(r, f)[lo:hi] for f in (
        "prompt_index", "prompt_ids", "completion_ids", "logprobs", "texts", "finish_reasons")))
        for lo, hi in ((0, 7), (7, 16))]
    assert w.score(halves, recs, shard=(1, 2)).rewards == pytest.approx(whole.rewards[8:],
                                                                        abs=1e-6)
    assert w.score(r.shard(0, 1)[0], recs).rewards == pytest.approx(expected, abs=1e-5)


def test_weight_shift_scale_and_name(rm_recipe, expected):
    w = make_rm(rm_recipe, weight=2.0, shift=0.1, scale=3.0, name="rm")
    s = w.score(_rollouts(), _records())
    assert set(s.per_verifier) == {"rm"}
    assert s.per_verifier["rm"] == pytest.approx(expected, abs=1e-5)
    assert s.rewards == pytest.approx([2.0 * (v - 0.1) * 3.0 for v in expected], abs=1e-4)


def test_truncation_keeps_the_end_of_the_completion(rm_recipe, rm_path):
    w = make_rm(rm_recipe, max_length=8, micro_batch_size=5)
    r, recs = _rollouts(), _records()
    s = w.score(r, recs)
    texts = [recs[p]["prompt"] + c for p, c in zip(r.prompt_index, r.texts)]
    assert max(len(w.encode(recs[p]["prompt"], c)) for p, c in zip(r.prompt_index, r.texts)) == 8
    assert s.rewards == pytest.approx(direct_scores(rm_path, texts, max_length=8), abs=1e-5)


def test_non_finite_outputs_score_none_and_are_named(rm_recipe, expected):
    w = make_rm(rm_recipe, micro_batch_size=3)
    v = w.tok.convert_tokens_to_ids("v")
    with torch.no_grad():  # every text containing "v" now scores NaN
        w.model.get_input_embeddings().weight[v] = math.nan
    r, recs = _rollouts(), _records()
    s = w.score(r, recs)
    bad = [i for i, c in enumerate(r.texts) if "v" in c]
    assert bad and s.failures == {"reward_model": len(bad)}
    assert s.failed_ids == [["p0#0", "p0#1", "p0#2", "p0#3", "p1#0", "p1#1", "p1#2", "p1#3",
                             "p2#0", "p2#1", "p2#2", "p2#3", "p3#0", "p3#1", "p3#2", "p3#3"][i]
                            for i in bad]
    for i, v in enumerate(s.rewards):
        assert (v is None) == (i in bad)
        assert v is None or v == pytest.approx(expected[i], abs=1e-5)
    assert s.per_verifier["reward_model"] == s.rewards


def test_chat_template(rm_recipe, rm_path, tmp_path):
    from transformers import AutoTokenizer

    path = tmp_path / "chat-rm"
    shutil.copytree(rm_path, path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'][0] }}:"
                         "{{ m['content'] }};{% endfor %}")
    tok.save_pretrained(path)
    w = make_rm(rm_recipe, model=str(path), chat_template=True, micro_batch_size=4)
    r, recs = _rollouts(), _records()
    s = w.score(r, recs)
    texts = [f"u:{recs[p]['prompt']};a:{c};" for p, c in zip(r.prompt_index, r.texts)]
    assert s.rewards == pytest.approx(direct_scores(path, texts), abs=1e-5)
    with pytest.raises(ValueError, match="no chat template"):
        make_rm(rm_recipe, chat_template=True)


def test_args_are_checked_at_validate_time():
    where = "roles.reward.args"
    with pytest.raises(RecipeError, match="roles.reward.args.model: required field is missing"):
        RewardModelWorker.check_args({}, where)
    with pytest.raises(RecipeError, match="roles.reward.args.batch: unknown field"):
        RewardModelWorker.check_args({"model": "m", "batch": 4}, where)
    assert JudgeRewardWorker.check_args({"model": "m"}, where).max_score == 10
    for args, msg in [
        ({"template": "{prompt} is graded"}, "must contain {completion}"),
        ({"template": "{} {completion}"}, "positional field"),
        ({"template": "{prompt {completion}"}, "template: Value error"),
        ({"pattern": r"Score: \d+"}, "exactly one group"),
        ({"pattern": r"Score: (\d+"}, "not a regular expression"),
        ({"max_score": 0}, "max_score"),
    ]:
        with pytest.raises(RecipeError, match=msg):
            JudgeRewardWorker.check_args({"model": "m", **args}, where)
    a = JudgeRewardWorker.check_args(
        {"model": "m", "template": "{prompt}|{completion}|{answer[0]}|{meta.level}"}, where)
    assert reward_model.template_fields(a.template) == {"prompt", "completion", "answer", "meta"}


@pytest.mark.slow
def test_two_ray_replicas_share_the_work(ray_local, rm_recipe, expected):
    ray = ray_local
    remote = ray.remote(RewardModelWorker).options(num_cpus=1, max_concurrency=1)
    args = RewardModelWorker.check_args({**rm_recipe.roles.reward.args, "threads": 1,
                                         "micro_batch_size": 3}, "roles.reward.args")
    actors = [remote.remote(WorkerContext("reward", k, 2, rm_recipe, args)) for k in range(2)]
    try:
        ray.get([a.setup.remote() for a in actors])
        refs = [ray.put(_rollouts())]  # as the controller passes them: a list of refs
        parts = ray.get([a.score.remote(refs, _records(), shard=(k, 2))
                         for k, a in enumerate(actors)])
        assert [len(p.rewards) for p in parts] == [8, 8]
        single = make_rm(rm_recipe).score(_rollouts(), _records())
        got = Scores.concat(parts)
        assert got.rewards == pytest.approx(single.rewards, abs=1e-5)
        assert got.rewards == pytest.approx(expected, abs=1e-5)
        assert not got.failures
    finally:
        for a in actors:
            ray.kill(a)


# --------------------------------------------------------------------------------------------
# Judge


def test_parse_grade():
    pat = reward_model.DEFAULT_PATTERN
    assert parse_grade("Score: 8", pat, 10) == 0.8
    assert parse_grade("reasoning...\nScore:10\nScore: 2", pat, 10) == 1.0  # first match
    assert parse_grade("Score: 3.25", pat, 5) == 0.65
    assert parse_grade("Score: 15", pat, 10) == 1.0  # clipped
    assert parse_grade("Score: -3", r"Score:\s*(-?\d+)", 10) == 0.0  # clipped
    assert parse_grade("score: 8", pat, 10) is None  # case matters unless the pattern says
    assert parse_grade("", pat, 10) is None
    assert parse_grade("Score: nan", r"Score:\s*(\S+)", 10) is None
    assert parse_grade("Score: inf", r"Score:\s*(\S+)", 10) is None
    assert parse_grade("Score: high", r"Score:\s*(\S+)", 10) is None
    assert parse_grade("7/9", r"^(\d)", 9) == pytest.approx(7 / 9)
    assert parse_grade("x7", r"^(\d)", 9) is None
    assert parse_grade("Score:", r"Score:(\d*)", 10) is None  # empty group


def test_doctests():
    assert doctest.testmod(reward_model, optionflags=doctest.ELLIPSIS).failed == 0


JUDGE_PROMPTS = ["1+2=", "12+30=", "(3*4)+5=", "7-2=", "9*9="]
JUDGE_COMPLETIONS = [["3", "4", "3"], ["42", "41", "ab"], ["17", "12"], ["5", "1" * 70],
                     ["81", "80"]]


@pytest.fixture(scope="module")
def judge(tiny_model, base_dir):
    """One vLLM engine for the module: the tiny random policy as a judge. With tied embeddings
    and random weights it echoes its last token under greedy decoding, so its "grade" is the
    completion's last character: a digit parses, a letter does not."""
    recipe = Recipe.model_validate(recipe_dict(
        tiny_model, base_dir / "judge-run",
        **{"roles.reward": {"cls": "workers.reward_model:JudgeRewardWorker",
                            "resources": {"num_cpus": 1}, "args": {"model": str(tiny_model)}}}))
    args = JudgeRewardWorker.check_args(
        {"model": str(tiny_model), "template": "{answer}|{prompt}{completion}",
         "pattern": r"^(\d)", "max_score": 9, "max_tokens": 6, "max_model_len": 64,
         "threads": 1, "name": "j", "weight": 2.0}, "roles.reward.args")
    w = JudgeRewardWorker(WorkerContext("reward", 0, 1, recipe, args))
    w.setup()
    yield w
    w.shutdown()


@pytest.mark.slow
def test_judge_grades_and_counts_what_it_cannot(judge):
    from vllm import SamplingParams

    r = _rollouts(JUDGE_PROMPTS, JUDGE_COMPLETIONS)
    recs = _records(JUDGE_PROMPTS)
    del recs[4]["answer"]  # the template names {answer}: p4's samples cannot be graded
    ids = [f"p{p}#{k}" for p, cs in enumerate(JUDGE_COMPLETIONS) for k in range(len(cs))]
    s = judge.score(r, recs)
    raw = s.per_verifier["j"]
    assert len(s.rewards) == len(raw) == len(r) == 12
    assert all(v is None or 0.0 <= v <= 1.0 for v in raw)
    assert s.rewards == [None if v is None else 2.0 * v for v in raw]
    nones = [i for i, v in enumerate(raw) if v is None]
    assert s.failures.get("j", 0) == len(nones)
    assert s.failed_ids == [ids[i] for i in nones]
    assert raw[ids.index("p3#1")] is None  # prompt longer than max_model_len
    assert raw[ids.index("p4#0")] is None and raw[ids.index("p4#1")] is None  # no {answer}
    assert raw == pytest.approx([3 / 9, 4 / 9, 3 / 9, 2 / 9, 1 / 9, None, 7 / 9, 2 / 9, 5 / 9,
                                 None, None, None])  # the echoed last characters
    # the grades are those of the judge's greedy replies, in sample order
    ok = [i for i in range(len(r)) if i not in (ids.index("p3#1"), 10, 11)]
    prompts = [judge.judge_prompt(recs[r.prompt_index[i]], r.texts[i]) for i in ok]
    replies = [o.outputs[0].text for o in judge.llm.generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)]
    assert [raw[i] for i in ok] == [parse_grade(t, r"^(\d)", 9) for t in replies]
    # still usable, and deterministic
    again = judge.score(r, recs)
    assert again.rewards == s.rewards and again.failures == s.failures
    part = judge.score(r, recs, shard=(1, 2))
    assert part.rewards == s.rewards[6:] and part.failed_ids == [ids[i] for i in nones if i >= 6]
