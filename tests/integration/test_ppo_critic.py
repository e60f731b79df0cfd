"""PPO with a critic (algorithm.advantage: gae): the value model is its own ZeRO-3 group of
two ranks beside the learner's; it trains on the GAE returns of every RL step (alone during
critic_warmup), and a run resumed from a checkpoint continues exactly — the critic's weights
and Adam moments included."""

import math
import shutil

import pytest
import torch

from orchestrator.controller import Controller

pytestmark = pytest.mark.slow

CRITIC = {"cls": "workers.learner.critic:DeepSpeedCritic", "replicas": 2,
          "resources": {"num_cpus": 1}, "args": {"zero_stage": 3, "threads": 1, "lr": 3e-3}}


def _recipe(make_recipe, run_dir, every=0, **over):
    return make_recipe(**{
        "run_dir": str(run_dir), "steps": 4, "checkpoint.every": every,
        "data.prompts_per_step": 4, "data.eval": None,
        # a random tiny model starts with a digit now and then: rewards that differ
        "roles.reward.args.verifiers": ["tests.fixtures.tasks:starts_with_digit"],
        "roles.critic": CRITIC, "algorithm.advantage": "gae", "algorithm.critic_warmup": 1,
        "algorithm.ppo_mini_batches": 2, "algorithm.ppo_epochs": 2} | over)


def _run(recipe, resume=None):
    c = Controller(recipe, resume=resume).setup()
    try:
        per_step = {}
        for step in range(c.start_step + 1, recipe.steps + 1):
            per_step[step] = c.train_step(step)
        policy = c.learner.call(c.learner.fanout("full_state_dict"))[0]
        critic = c.critic.call(c.critic.fanout("full_state_dict"))[0]
        return per_step, policy, critic
    finally:
        c.shutdown()


def test_ppo_with_a_critic_trains_and_resumes_exactly(ray_local, make_recipe, tmp_path):
    straight, policy_a, critic_a = _run(_recipe(make_recipe, tmp_path / "a", every=2))
    first = straight[1]
    assert "value/loss" in first and "rl/loss" not in first  # critic warm-up: critic alone
    for step in (2, 3, 4):
        m = straight[step]
        assert math.isfinite(m["value/loss"]) and math.isfinite(m["rl/loss"])
        assert m["critic/grad_norm"] > 0 and m["critic_optimizer/main_steps"] == 4.0 * step
        assert m["optimizer/main_steps"] == 4.0 * (step - 1)  # 2 mini-batches x 2 epochs
    assert any(straight[s]["value/clipfrac"] > 0 for s in (2, 3, 4))  # epoch 2 moved V
    assert "score.weight" in critic_a  # the value head of the token-classification model
    # the straight run's checkpoint of step 2 (its run folder copied: the mlflow run it names
    # lives there), resumed to the end
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    resumed, policy_b, critic_b = _run(_recipe(make_recipe, tmp_path / "b"),
                                       resume=str(tmp_path / "b" / "checkpoints" / "step_000002"))
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        for k in ("value/loss", "rl/loss", "critic/grad_norm", "rl/grad_norm"):
            assert resumed[step][k] == pytest.approx(straight[step][k], rel=1e-6), (step, k)
    for a, b in ((policy_a, policy_b), (critic_a, critic_b)):
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_critic_values_sit_before_each_token_on_uneven_ranks(ray_local, make_recipe, tmp_path):
    """V(s_t) is read at the position that predicts token t: the first value of two
    completions of one prompt is the prompt's value, the same for both; rank 0 returns every
    row, also when the ranks have different numbers of micro-batches (3 rows, 2 ranks,
    one row per micro-batch: one rank pads with an empty one)."""
    import ray

    from orchestrator.groups import WorkerGroup
    from orchestrator.setup import resolve_recipe
    from workers.types import Rollouts

    recipe = _recipe(make_recipe, tmp_path / "v", **{"algorithm.micro_batch_size": 1})
    cls, args = resolve_recipe(recipe).roles["critic"]
    group = WorkerGroup("critic", recipe.roles.critic, recipe, cls, args, {})
    try:
        addr, port = ray.get(group.actors[0].master_address.remote())
        group.call(group.fanout("setup", master_addr=addr, master_port=port), "setup")
        r = Rollouts([0, 0, 1], [[1, 5, 6], [1, 5, 6], [1, 7, 7, 9]], [[8, 9], [4], [8]],
                     [[], [], []], ["", "", ""], ["stop"] * 3)
        per_rank = group.call(group.fanout("values", r), "values")
        # no dropout before the value head (transformers' default would be 0.1)
        assert ray.get(group.actors[0].__ray_call__.remote(lambda w: w.lm.dropout.p)) == 0.0
    finally:
        group.shutdown()
    values = per_rank[0]
    assert per_rank[1] is None  # rank 0 returns every row
    assert [len(v) for v in values] == [2, 1, 1]
    assert values[0][0] == pytest.approx(values[1][0], abs=1e-6)  # same prompt, same state
    assert values[0][0] != pytest.approx(values[2][0], abs=1e-6)  # another prompt
    assert values[0][1] != pytest.approx(values[0][0], abs=1e-6)  # after token 8
