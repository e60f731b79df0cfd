"""What happens to samples no verifier could score: counted as 0 or dropped from the RL update
(and from their group's baseline), and a step with too many stops the run."""

import pytest

from orchestrator.controller import Controller
from orchestrator.demos import DemoStore
from orchestrator.groups import WorkerError
from orchestrator.schedules import RLUpdate
from orchestrator.updates import rl_terms
from workers.types import Scores


def _controller(make_recipe, **scoring):
    c = Controller(make_recipe(scoring=scoring))
    c.reference, c.demos = None, DemoStore(None)
    return c


def _gen(rewards):
    # two prompts, three samples each
    return {"prompt_index": [0, 0, 0, 1, 1, 1], "refs": [], "scores": Scores(rewards=rewards)}


BATCH = [{"id": "a", "prompt": "1+1="}, {"id": "b", "prompt": "2+2="}]


def test_unscored_samples_count_as_zero_by_default(make_recipe):
    c = _controller(make_recipe)
    (term,) = rl_terms(c, RLUpdate(), BATCH, _gen([1.0, None, 0.0, 1.0, 1.0, 0.0]), step=1)
    assert term["select"] is None
    adv = term["advantages"]
    assert adv[1] == pytest.approx(adv[2])  # None scored like the 0.0 beside it
    assert adv[0] > 0 > adv[1]


def test_dropped_samples_leave_the_update_and_the_baseline(make_recipe):
    c = _controller(make_recipe, unscored="drop")
    (term,) = rl_terms(c, RLUpdate(), BATCH, _gen([1.0, None, 0.0, 1.0, 1.0, 0.0]), step=1)
    assert term["select"] == [0, 2, 3, 4, 5]
    adv = term["advantages"]
    assert adv[1] == 0.0
    # prompt a's baseline is the mean of 1.0 and 0.0 only: symmetric advantages
    assert adv[0] == pytest.approx(-adv[2]) and adv[0] > 0
    everything_unscored = _gen([None] * 6)
    assert rl_terms(c, RLUpdate(), BATCH, everything_unscored, step=1) == []


def test_too_many_unscored_samples_stop_the_run(make_recipe):
    c = _controller(make_recipe, max_unscored_frac=0.5)
    c.check_unscored(1, Scores(rewards=[None, None, None, 1.0, 0.0, 1.0]))  # 50%: allowed
    scores = Scores(rewards=[None] * 4 + [1.0, 0.0], failures={"exact_answer": 4},
                    failed_ids=["a#0", "a#1", "a#2", "b#0"])
    with pytest.raises(WorkerError, match=r"step 7: 4 of 6 samples could not be scored .*"
                       r"exact_answer.*a#0.*scoring.max_unscored_frac=0.5"):
        c.check_unscored(7, scores)
