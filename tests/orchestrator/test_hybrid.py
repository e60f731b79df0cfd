"""Hybrid schedules on scripted signals — no Ray, no workers."""

import pytest

from orchestrator.schedules import MixedUpdate, Probe, RLUpdate, SFTUpdate, build_schedule
from orchestrator.signals import PromptStats, StepSignals


def sig(step, solved: dict[str, int], demo=True, probes=None) -> StepSignals:
    prompts = [PromptStats(pid, 4, k, [1.0] * k + [0.0] * (4 - k), 3.0, demo)
               for pid, k in solved.items()]
    s = StepSignals(step, prompts, 0.0, 0.0, 0.0, 0.0, 0)
    s.probes.update(probes or {})
    return s


def test_relift_buffers_unsolved_prompts_newest_first_and_fires_at_m():
    r = build_schedule("relift", {"buffer_size": 3, "entropy": 1e-3})
    assert r.decide(1, sig(1, {"a": 0, "b": 2, "c": 0})) == [RLUpdate()]
    assert r.buffer == ["a", "c"]
    ops = r.decide(2, sig(2, {"d": 0, "e": 4, "f": 0}))
    # newest first: d, f from this step, then a from the last one; c stays buffered
    assert ops == [RLUpdate(), SFTUpdate(ids=("d", "f", "a"), entropy=1e-3, optimizer="sft")]
    assert r.buffer == ["c"]
    m = r.metrics()
    assert (m["relift/sft_triggers"], m["relift/buffer_depth"], m["relift/trigger_rate"]) == \
        (1.0, 1.0, 0.5)


def test_relift_ignores_prompts_without_demonstrations_and_round_trips_its_state():
    r = build_schedule("relift", {"buffer_size": 2})
    r.decide(1, sig(1, {"a": 0}, demo=False))
    assert r.buffer == []
    r.decide(2, sig(2, {"b": 0}))
    state = r.state_dict()
    r2 = build_schedule("relift", {"buffer_size": 2})
    r2.load_state_dict(state)
    assert r2.decide(3, sig(3, {"c": 0}))[1] == SFTUpdate(ids=("c", "b"), optimizer="sft")


def test_sasr_warms_up_on_sft_then_chooses_by_gradient_norm():
    s = build_schedule("sasr", {"warmup_steps": 2, "seed": 0})
    assert not s.wants_rollouts(2) and s.wants_rollouts(3)
    assert s.probes(1, None) == [Probe("sft_grad_norm")]
    for step in (1, 2):
        assert s.decide(step, sig(step, {}, probes={"sft_grad_norm": 2.0})) == [SFTUpdate()]
    # g = G_w -> p = 0.5; g >> G_w -> nearly always SFT; g = 0 -> always RL
    picks = [s.decide(3 + i, sig(3 + i, {"a": 1}, probes={"sft_grad_norm": 2.0}))[0]
             for i in range(400)]
    share = sum(isinstance(o, SFTUpdate) for o in picks) / len(picks)
    assert 0.4 < share < 0.6
    assert s.decide(500, sig(500, {}, probes={"sft_grad_norm": 0.0})) == [RLUpdate()]
    assert s.metrics()["sasr/warmup_grad_norm"] == 2.0
    # the RNG is part of the state: a restored schedule makes the same choices
    state = s.state_dict()
    t = build_schedule("sasr", {"warmup_steps": 2, "seed": 0})
    t.load_state_dict(state)
    draws = lambda x: [x.decide(900 + i, sig(900, {}, probes={"sft_grad_norm": 2.0}))  # noqa
                       for i in range(20)]
    assert draws(s) == draws(t)


def test_hpt_routes_each_prompt_in_one_step():
    h = build_schedule("hpt", {"switch_gate": 1, "sft_coef": 0.5})
    ops = h.decide(1, sig(1, {"a": 0, "b": 1, "c": 3}))
    assert ops == [MixedUpdate((RLUpdate(ids=("c",)), SFTUpdate(ids=("a", "b"), coef=0.5)))]
    assert h.metrics()["hpt/sft_frac"] == pytest.approx(2 / 3)


def test_luffy_puts_demonstrations_in_the_group():
    assert build_schedule("luffy", {"gamma": 0.2}).decide(1, sig(1, {"a": 0})) == \
        [RLUpdate(demos_in_group=True, gamma=0.2)]


def test_chord_mu_schedule_and_phi():
    c = build_schedule("chord", {"mu_peak": 0.9, "mu_valley": 0.1, "warmup_steps": 2,
                                 "decay_steps": 10, "phi": True})
    assert [round(c.mu_at(s), 3) for s in (1, 2, 7, 12, 50)] == [0.45, 0.9, 0.5, 0.1, 0.1]
    (op,) = c.decide(7, sig(7, {"a": 1}))
    assert op == MixedUpdate((RLUpdate(coef=0.5), SFTUpdate(coef=0.5, token_weight="p(1-p)")))
    fixed = build_schedule("chord", {"mu_fixed": 0.1})
    assert fixed.mu_at(1) == fixed.mu_at(1000) == 0.1
