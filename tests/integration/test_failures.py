"""Surviving failures: actors killed mid-step (their processes exit, as in an OOM kill) are
replaced and the run completes; a dead learner rank stops the run with a message naming the
checkpoint, and ``failures.auto_resume`` brings it back from there."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from orchestrator.config import DeadlineConfig
from orchestrator.controller import Controller
from orchestrator.groups import Deadlines, WorkerError
from orchestrator.recovery import LearnerLost, explain
from tests.conftest import ROOT, recipe_dict
from tests.fixtures.greedy import hf_greedy

pytestmark = pytest.mark.slow


def test_rollout_reward_and_reference_deaths_are_survived(ray_local, make_recipe, tmp_path):
    die = str(tmp_path / "markers")
    os.makedirs(die)

    def role(cls, at):
        return {"cls": f"tests.fixtures.dying:{cls}",
                "env": {"BRAID_DIE_AT": at, "BRAID_DIE_DIR": die}}

    recipe = make_recipe(**{
        "steps": 3, "data.prompts_per_step": 4, "algorithm.kl": 0.01,
        # generate calls: eval at step 0, step 1, step 2 (after the first sync: version 1);
        # the replacement then dies receiving its second push (step 2's sync: mid-sync); the
        # next one hangs in its second (step 3's sync) and is killed at its deadline
        "roles.rollout": {**recipe_dict_role("rollout"),
                          **role("DyingRollout", "generate:3,receive_weights:2")},
        "roles.rollout.env.BRAID_HANG_AT": "receive_weights:2",
        # the reward actor dies in its set-up, its replacement in its fourth score
        "roles.reward": {**recipe_dict_role("reward"), **role("DyingReward", "setup:1,score:4")},
        "roles.reference": {**role("DyingReference", "logprobs:2"),
                            "resources": {"num_cpus": 0.5}},
        # rank 1 hangs in its fourth update (step 4, run after the recipe's steps below)
        "roles.learner.cls": "tests.fixtures.dying:DyingLearner",
        "roles.learner.env": {"BRAID_HANG_AT": "update:4:1", "BRAID_DIE_DIR": die},
        # the hung engine is killed once the learner's broadcast gave up (10 s) and its own
        # deadline passed (10 s after that)
        "failures.deadline.calls": {"rollout.receive_weights": 10}, "weight_sync.timeout_s": 10,
    })
    c = Controller(recipe).setup()
    try:
        per_step = {}
        c.evaluate(0)
        for step in range(1, 4):
            per_step[step] = c.train_step(step)
        final = c.evaluate(3)
        # the engine now running is the third replacement: it holds the learner's weights
        records = [{"id": f"g{i}", "prompt": p} for i, p in enumerate(["12+7=", "3+4=", "9+9="])]
        greedy = c.rollout.call(c.generate(records, step=3, greedy=True)["refs"])[0]
        state = c.learner.call(c.learner.fanout("full_state_dict"))[0]
        # a hung learner rank: killed at the deadline, and the run stops naming no checkpoint
        c.learner.deadlines = Deadlines(DeadlineConfig(calls={"learner.update": 5}), "learner")
        with pytest.raises(WorkerError) as hung:
            try:
                c.train_step(4)
            except WorkerError as err:
                raise explain(c, err) from err
    finally:
        c.shutdown()
    assert greedy.completion_ids == hf_greedy(recipe.model.path, [r["prompt"] for r in records],
                                              recipe.sampling.max_tokens, state)
    assert isinstance(hung.value, LearnerLost) and hung.value.checkpoint is None
    assert "learner rank(s) [0, 1] did not finish update within 5s" in str(hung.value)
    assert "killed as hung" in str(hung.value) and "no checkpoint was written" in str(hung.value)
    assert c.restarts == {"reward": 2, "rollout": 3, "reference": 1, "learner": 1}
    assert sorted(os.listdir(die)) == [
        "learner-BRAID_HANG_AT-update-1", "reference-logprobs-0", "reward-score-0",
        "reward-setup-0",
        "rollout-BRAID_HANG_AT-receive_weights-0", "rollout-generate-0",
        "rollout-receive_weights-0"]
    # the replacement engine generated step 2 with the weights of step 1's update
    assert per_step[2]["rollout/weight_version"] == 1.0
    assert per_step[3]["rollout/weight_version"] == 2.0
    assert per_step[3]["restarts/rollout"] == 3.0 and per_step[3]["restarts/reward"] == 2.0
    for step in (1, 2, 3):
        assert per_step[step]["reward/unscored"] == 0.0
        assert "rl/loss" in per_step[step] and "rl/kl" in per_step[step]
    assert 0.0 <= final["eval/accuracy"] <= 1.0


def recipe_dict_role(role: str) -> dict:
    return recipe_dict("m", "r")["roles"][role]


@pytest.mark.parametrize("engine,how", [
    ("DyingRollout", "BRAID_DIE_AT"),
    pytest.param("DyingAsyncRollout", "BRAID_DIE_AT", marks=pytest.mark.long),
    pytest.param("DyingAsyncRollout", "BRAID_KILL_ENGINE_AT", marks=pytest.mark.long)])
def test_an_engine_dying_with_a_step_in_flight_regenerates_it(ray_local, make_recipe, tmp_path,
                                                             engine, how):
    """rollout.max_staleness: 1 — step 2's rollouts are generating while step 1 learns when the
    engine dies; the sync finds it dead and replaces it, and step 2 regenerates its rollouts
    under the new weights (counted), after which the pipeline runs a step ahead again. Also
    with vLLM's asynchronous engine (an async actor, its engine core a process of its own), and
    with only that engine core process killed: the actor then exits and is replaced."""
    die = str(tmp_path / "markers")
    os.makedirs(die)
    recipe = make_recipe(**{
        "steps": 3, "data.prompts_per_step": 4, "rollout.max_staleness": 1,
        # generate calls: eval at step 0, step 1 (now), step 2 (ahead, during step 1)
        "roles.rollout": {**recipe_dict_role("rollout"), "cls": f"tests.fixtures.dying:{engine}",
                          "env": {how: "generate:3", "BRAID_DIE_DIR": die}}})
    c = Controller(recipe).setup()
    try:
        c.evaluate(0)
        per_step = {step: c.train_step(step) for step in (1, 2, 3)}
    finally:
        c.shutdown()
    assert c.restarts == {"rollout": 1}
    # step 2's rollouts regenerated; the asynchronous engine runs step 1's and step 2's calls
    # together, so it dies with both in flight and step 1's are regenerated too. So may the
    # synchronous one: it dies as step 2's call starts, and step 1's reply, already computed,
    # may not have left the process yet (seen on a loaded machine) — either way one engine
    # died and was replaced once, and step 2 trained on rollouts of the new weights
    regenerated = per_step[2]["rollout/regenerated_total"]
    assert regenerated == 2.0 or (engine == "DyingRollout" and regenerated == 1.0)
    assert per_step[2]["rollout/weight_version"] == 1.0 and per_step[2]["rollout/staleness"] == 0
    # step 3's rollouts were generated ahead again, during step 2 (under the asynchronous
    # engine, the sync after step 2 may reach it first)
    assert per_step[3]["rollout/staleness"] == 1 or (
        engine == "DyingAsyncRollout" and per_step[3]["rollout/staleness"] == 0)
    assert all("rl/loss" in per_step[s] for s in (1, 2, 3))


@pytest.mark.long
def test_learner_death_names_the_checkpoint_and_auto_resumes(tiny_model, tmp_path):
    d = recipe_dict(tiny_model, tmp_path / "run", steps=4)
    d["data"]["prompts_per_step"] = 4
    d["checkpoint"] = {"every": 2}
    d["failures"] = {"auto_resume": 1}
    d["roles"]["learner"]["cls"] = "tests.fixtures.dying:DyingLearner"
    # rank 1 dies in its fourth update (step 4), two steps after the checkpoint of step 2
    d["roles"]["learner"]["env"] = {"BRAID_DIE_AT": "update:4:1",
                                    "BRAID_DIE_DIR": str(tmp_path)}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(d))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", "recipe.yaml"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    assert "learner rank(s) [1] died" in proc.stderr, proc.stderr[-3000:]
    assert f"auto_resume: restarting from {ckpt}" in proc.stderr
    assert f"resumed from {ckpt} at step 2" in proc.stdout
    assert (tmp_path / "learner-update-1").exists()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 4 and [e["step"] for e in summary["eval"]][-1] == 4
    # the lost attempt counts in the run's restarts; step 3, logged by the first attempt and
    # run again by the second, has one value per metric in mlflow
    assert summary["restarts"] == {"learner": 1}
    assert "steps 3-3 run again but are not logged again" in proc.stdout
    import mlflow

    client = mlflow.MlflowClient(summary["mlflow"]["uri"])
    run = summary["mlflow"]["run_id"]
    keys = client.get_run(run).data.metrics
    steps = {k: [m.step for m in client.get_metric_history(run, k)] for k in keys}
    assert sorted(steps["weight_version"]) == [1, 2, 3, 4]
    assert sorted(steps["restarts/learner"]) == [3, 4]
    assert all(len(s) == len(set(s)) for s in steps.values()), steps
