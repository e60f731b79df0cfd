"""Per-call deadlines (failures.deadline): fixed by 'role.method' or role, else derived from the
role's recent calls of that method with a floor."""

import pytest

from core.errors import RecipeError
from orchestrator.config import DeadlineConfig, load_recipe
from orchestrator.groups import Deadlines
from tests.conftest import ROOT


def test_a_deadline_is_the_floor_until_calls_were_timed_then_factor_times_the_slowest():
    d = Deadlines(DeadlineConfig(floor_s=60, factor=4, window=3), "rollout")
    assert d.seconds("generate") == 60  # nothing timed yet
    d.observe("generate", 10.0)
    d.observe("generate", 30.0)
    assert d.seconds("generate") == 120  # 4 x 30
    d.observe("generate", 5.0)
    d.observe("generate", 5.0)
    d.observe("generate", 5.0)  # the window (3) forgot the 30 s call
    assert d.seconds("generate") == 60  # 4 x 5 = 20 < the floor
    assert d.seconds("receive_weights") == 60  # methods are timed apart
    d.observe("setup of replacement rank 1", 200.0)  # the first word is the method
    assert d.seconds("setup of replacement rank 0") == 800


def test_fixed_deadlines_by_role_and_method_win_and_zero_means_none():
    cfg = DeadlineConfig(floor_s=60, calls={"rollout": 30, "rollout.generate": 0,
                                            "learner.update": 900})
    rollout, learner = Deadlines(cfg, "rollout"), Deadlines(cfg, "learner")
    rollout.observe("score", 100.0)
    assert rollout.seconds("receive_weights") == 30  # the role's
    assert rollout.seconds("generate") is None  # 0: no deadline
    assert learner.seconds("update") == 900 and learner.seconds("push_weights") == 60


def test_deadline_keys_name_roles_and_null_turns_deadlines_off():
    with pytest.raises(ValueError, match="rolout.generate"):
        DeadlineConfig(calls={"rolout.generate": 10})
    with pytest.raises(ValueError, match="seconds >= 0"):
        DeadlineConfig(calls={"reward": -1})
    recipe = ROOT / "recipes" / "arith_grpo_cpu.yaml"
    assert load_recipe(recipe).failures.deadline.floor_s == 1800
    assert load_recipe(recipe, ["failures.deadline=null"]).failures.deadline is None
    with pytest.raises(RecipeError, match="failures.deadline: .*calls: rewrd"):
        load_recipe(recipe, ["failures.deadline.calls={reward.scor: 5, rewrd: 1}"])
