import pytest

from core.errors import RecipeError
from orchestrator.schedules import RL, SFT, Eval, Phases, RLUpdate, SFTUpdate, Sync, build_schedule
from orchestrator.signals import step_signals


def test_step_signals():
    recs = [{"id": "a", "prompt": "1+1=", "demonstration": "2"}, {"id": "b", "prompt": "2+2="}]
    s = step_signals(3, recs, [0, 0, 1, 1], [1.0, 0.0, 0.0, None], [2, 3, 4, 5])
    assert (s.step, s.pass_rate, s.zero_success_frac, s.zero_variance_frac, s.unscored) == \
        (3, 0.25, 0.5, 0.5, 1)
    assert [(p.id, p.n_correct, p.has_demo, p.mean_length) for p in s.prompts] == \
        [("a", 1, True, 2.5), ("b", 0, False, 4.5)]


def test_rl_and_sft():
    assert RL().decide(1, None) == [RLUpdate()] and RL().wants_rollouts(1)
    assert SFT().decide(1, None) == [SFTUpdate()] and not SFT().wants_rollouts(1)


def test_phases_switch_and_close_each_phase_with_eval():
    p = build_schedule("phases", {"phases": [{"policy": "sft", "steps": 2},
                                             {"policy": "rl", "steps": 3}]})
    assert isinstance(p, Phases)
    plan = {s: (p.wants_rollouts(s), p.decide(s, None)) for s in range(1, 6)}
    assert plan[1] == (False, [SFTUpdate()])
    assert plan[2] == (False, [SFTUpdate(), Sync(), Eval()])
    assert plan[3] == (True, [RLUpdate()]) and plan[5] == (True, [RLUpdate()])
    assert p.metrics() == {"schedule/phase": 1.0}


def test_user_schedule_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_sched.py").write_text(
        "from orchestrator.schedules import Schedule, RLUpdate, SFTUpdate\n"
        "class EveryOther(Schedule):\n"
        "    def decide(self, step, signals):\n"
        "        return [SFTUpdate()] if step % 2 else [RLUpdate()]\n")
    monkeypatch.chdir(tmp_path)
    s = build_schedule("my_sched:EveryOther", {})
    assert [s.decide(i, None) for i in (1, 2)] == [[SFTUpdate()], [RLUpdate()]]
    with pytest.raises(RecipeError, match="schedule.args.unexpected_arg: unknown field"):
        build_schedule("my_sched:EveryOther", {"unexpected_arg": 1})


def test_demo_store_budget_and_peek():
    from orchestrator.demos import DemoStore

    d = DemoStore(budget=2)
    d.add([{"id": i, "prompt": "p", "demonstration": "x"} for i in "abc"] + [{"id": "z"}])
    assert [r["id"] for r in d.take(["a", "z"])] == ["a"]
    assert [r["id"] for r in d.take(["b", "c", "a"])] == ["b", "a"]  # c is past the budget
    assert [r["id"] for r in d.take(["c"], peek=True)] == ["c"]     # a probe: not counted
    assert d.metrics() == {"demos/used": 2.0, "demos/refused": 1.0, "demos/known": 3.0}
    e = DemoStore(budget=2)
    e.load_state_dict(d.state_dict())
    assert e.take(["c"]) == [] and e.metrics() == d.metrics() | {"demos/refused": 2.0}


def test_demo_store_keeps_only_ids_of_a_datasets_demonstrations(tmp_path):
    """With the dataset's by_id, a checkpoint holds ids, not 8k-token solutions; a teacher's
    demonstrations (not in the dataset) are kept whole."""
    import json

    from orchestrator.data import FileDataset
    from orchestrator.demos import DemoStore

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": "p", "answer": "1",
                                        "demonstration": "long " * 1000}) + "\n"
                            for i in range(3)))
    ds = FileDataset(path=str(path))
    d = DemoStore(lookup=ds.by_id)
    d.add(list(ds))
    d.add([{"id": "t0", "prompt": "p", "demonstration": "a teacher's"}], owned=True)
    state = json.loads(json.dumps(d.state_dict()))
    assert len(json.dumps(state)) < 500
    e = DemoStore(lookup=ds.by_id)
    e.load_state_dict(state)
    assert e.take(["q1", "t0"]) == [ds[1], {"id": "t0", "prompt": "p",
                                            "demonstration": "a teacher's"}]


def test_rft_schedule():
    from orchestrator.schedules import MixedUpdate

    sig = step_signals(1, [{"id": "a", "prompt": "1+1="}, {"id": "b", "prompt": "2+2="}],
                       [0, 0, 1, 1], [1.0, 0.0, 0.0, 0.0], [1, 1, 1, 1])
    rft = build_schedule("rft", {"per_prompt": 2})
    (op,) = rft.decide(1, sig)
    assert op == SFTUpdate(source="samples", per_prompt=2)
    assert rft.metrics() == {"rft/accepted_frac": 0.5}
    nothing = step_signals(2, [{"id": "a", "prompt": "1+1="}], [0, 0], [0.0, 0.0], [1, 1])
    assert rft.decide(2, nothing) == []  # no accepted sample: no step
    (mixed,) = build_schedule("rft", {"rl_coef": 0.5}).decide(1, sig)
    assert isinstance(mixed, MixedUpdate)
    assert mixed.terms == (RLUpdate(coef=0.5), SFTUpdate(source="samples"))
