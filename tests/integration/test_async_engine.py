"""vLLM's asynchronous engine (workers.rollout.vllm_async) through the real stack: the weight sync
and outputs of the synchronous engine, and partial rollouts — samples frozen by a weight update
and continued under the new weights, each token's behaviour log-prob from the weights that
sampled it."""

import time

import pytest

from orchestrator.controller import Controller
from orchestrator.metrics import Timings
from orchestrator.schedules import SFTUpdate
from tests.fixtures.greedy import hf_logprobs
from tests.integration.test_weight_sync_vllm import check_sync

pytestmark = pytest.mark.slow

ASYNC = {"roles.rollout.cls": "workers.rollout.vllm_async:AsyncVLLMRollout",
         "algorithm.lr": 5e-2, "algorithm.sft_lr": 5e-2}


@pytest.mark.long
def test_async_engine_greedy_equals_learner_hf_after_sync(ray_local, make_chat_recipe):
    check_sync(make_chat_recipe(**ASYNC, **{"weight_sync.bucket_mb": 0.05}), big_batch=False)


def test_partial_rollouts_continue_under_new_weights(ray_local, make_chat_recipe):
    import ray

    recipe = make_chat_recipe(**ASYNC, **{"roles.rollout.args.update_mode": "keep"})
    c = Controller(recipe).setup()
    try:
        records = [{"id": f"r{i}", "prompt": f"What is {i}+{i}?", "demonstration": str(2 * i)}
                   for i in range(64)]
        items = [{"prompt_ids": c.prompts.prompt_ids(r), "seed": i}
                 for i, r in enumerate(records)]
        c.generate(records[:4], step=0)  # the engine's first call carries its warm-up
        c.demos.add(records)
        for _ in range(3):  # the learner moves away from the engine's weights (version 0)
            c.execute(SFTUpdate(), 1, records[:8], None, Timings())
        summary, ref = c.rollout.actors[0].generate.options(num_returns=2).remote(
            items, 4, {"temperature": 1.0, "max_tokens": 200, "ignore_eos": True})
        time.sleep(1.0)  # 256 samples of 200 tokens: ~4 s here; the sync lands among them
        c.sync_weights()
        r = ray.get(ref)
        assert ray.get(summary)["spanning"] == sum(a != b for a, b in r.versions)
        state = c.learner.call(c.learner.fanout("full_state_dict"))[0]
    finally:
        c.shutdown()
    spanning = [i for i, (first, last) in enumerate(r.versions) if first != last]
    assert spanning, "no sample was in flight when the weights were updated"
    assert all(r.versions[i] == (0, 1) for i in spanning)
    assert set(r.versions) <= {(0, 0), (0, 1), (1, 1)} and r.weight_version == 0
    assert all(len(c) == 200 for c in r.completion_ids)
    i = spanning[0]
    prompt, completion = [r.prompt_ids[i]], [r.completion_ids[i]]
    old = hf_logprobs(recipe.model.path, prompt, completion)[0]
    new = hf_logprobs(recipe.model.path, prompt, completion, state)[0]
    # the first token was sampled by the old weights, the last by the new ones (re-reading
    # the tokens before it)
    assert abs(r.logprobs[i][0] - old[0]) < 1e-3
    assert abs(r.logprobs[i][-1] - new[-1]) < 1e-3
    assert abs(old[-1] - new[-1]) > 1e-2  # and the two differ


@pytest.mark.long
def test_lora_adapters_with_rollouts_a_step_ahead(ray_local, make_chat_recipe):
    """LoRA adapters on the asynchronous engine with rollouts one step ahead
    (rollout.max_staleness 1): the engine holds an adapter per version in flight (2 slots), a
    step's samples all come from one adapter (their versions exact), and the RL steps train on
    them — an adapter evicted while still asked for would fail the generation."""
    recipe = make_chat_recipe(**ASYNC, **{"model.lora": {"rank": 8, "alpha": 16},
                                          "rollout.max_staleness": 1, "steps": 4,
                                          "schedule": {"policy": "rl"}})
    c = Controller(recipe).setup()
    try:
        metrics = [c.train_step(step) for step in range(1, 5)]
    finally:
        c.shutdown()
    versions = [m["rollout/weight_version"] for m in metrics]
    assert versions[0] == 0 and versions[-1] >= 2, versions  # adapters 1.. were sampled from
    assert all(m["weight_version"] - m["rollout/weight_version"] <= 2 for m in metrics)
    assert all(m["rl/tokens"] > 0 for m in metrics)
