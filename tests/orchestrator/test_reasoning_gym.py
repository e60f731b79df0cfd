"""reasoning-gym as a built-in dataset and verifier: records from its generators, scored by its
own scorers — single-turn and as a one-turn environment — with stable ids, train and eval seeds
that share nothing, clear errors for a bad task, and a recipe that `braid validate` passes."""

import asyncio
import itertools
import json
import subprocess
import sys

import pytest
import yaml

pytest.importorskip("reasoning_gym", reason="the gym extra: pip install 'braid-rl[gym]'")

from core.errors import DataError  # noqa: E402
from orchestrator.data import ReasoningGym  # noqa: E402
from rewards.gym import reasoning_gym  # noqa: E402
from tests.conftest import ROOT, recipe_dict  # noqa: E402
from workers.agent.env import Turn, VerifierEnv  # noqa: E402

TASKS = ["chain_sum", "letter_counting", "spell_backward"]


def records(**args):
    return list(itertools.islice(ReasoningGym(**{"tasks": TASKS} | args), 30))


def score(recs, texts):
    fields = {k: [r[k] for r in recs] for k in ("task", "metadata", "answer")}
    return reasoning_gym([r["prompt"] for r in recs], texts, **fields)


def test_records_of_three_tasks_score_their_answer_1_and_a_wrong_one_0():
    recs = records(size=30, seed=1)
    assert {r["task"] for r in recs} == set(TASKS)
    for r in recs:
        assert r["metadata"]["source_dataset"] == r["task"] and r["answer"]
        assert json.loads(json.dumps(r)) == r  # records may go into checkpoints
    right = score(recs, [f"Thinking...\n<answer>{r['answer']}</answer>" for r in recs])
    assert right == [1.0] * len(recs)
    assert score(recs, ["<answer>#</answer>"] * len(recs)) == [0.0] * len(recs)
    assert score(recs, [r["answer"] for r in recs]) == [0.0] * len(recs)  # no tags: no answer


def test_ids_and_records_repeat_with_a_seed_and_train_and_eval_seeds_share_nothing():
    assert records(seed=1) == records(seed=1)  # a stream, read twice
    train, held_out = records(seed=1), records(seed=2, size=30)
    assert len({r["id"] for r in train}) == 30
    # reasoning-gym seeds entry j with seed + j: passed through, seeds 1 and 2 would share
    # all but one entry of each task
    questions = {r["prompt"] for r in train if r["task"] == "chain_sum"}
    assert questions and not questions & {r["prompt"] for r in held_out}
    assert not {r["id"] for r in train} & {r["id"] for r in held_out}


def test_a_one_turn_environment_scores_as_the_verifier_does():
    env = VerifierEnv(verifiers=["rewards.gym:reasoning_gym"])
    rec = records(size=1)[0]

    async def play(text):
        await env.reset(rec, seed=0)
        return await env.step(Turn(text=text, token_ids=[]))

    res = asyncio.run(play(f"<answer>{rec['answer']}</answer>"))
    assert (res.reward, res.terminated) == (1.0, True)
    assert res.info["reward_components"] == {"reasoning_gym": 1.0}
    assert asyncio.run(play("<answer>?</answer>")).reward == 0.0


@pytest.mark.parametrize("args, match", [
    ({"tasks": ["chain_summ"]}, r"reasoning-gym has no task 'chain_summ' \(did you mean "
                                r"chain_sum"),
    ({"tasks": [{"name": "chain_sum", "config": {"min_termz": 2}}]},
     r"reasoning-gym task chain_sum \(config \{'min_termz': 2\}\): TypeError: .*min_termz"),
    ({"tasks": ["chain_sum", "chain_sum"]}, "a task is named twice"),
])
def test_a_bad_task_is_named(args, match):
    with pytest.raises(DataError, match=match):
        ReasoningGym(**args)


def test_braid_validate_passes_a_recipe_on_reasoning_gym(tiny_chat_model, tmp_path):
    data = {"cls": "orchestrator.data:ReasoningGym", "args": {"tasks": TASKS, "seed": 1}}
    d = recipe_dict(tiny_chat_model, tmp_path / "run", **{
        "data.train": data, "data.eval": data | {"args": {"tasks": TASKS, "seed": 2, "size": 8}},
        "roles.reward.args.verifiers": ["rewards.gym:reasoning_gym"],
        "roles.rollout.args.max_model_len": 512, "sampling.max_tokens": 64})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(d))
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "validate", str(path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr + out.stdout
    assert "data.train: first 8 prompts are" in out.stdout  # generated and tokenised
