"""The recovery loop's decisions without Ray (orchestrator/recovery.py): a call whose inputs Ray
lost remakes them and runs again, within a bound; the real faults are in tests/integration
(test_node_loss.py: rollouts lost with their node; test_ray_failures.py: Ray's memory monitor)."""

import pytest

from orchestrator.groups import WorkerError
from orchestrator.recovery import LOST_RETRIES, recoverable


class Scripted:
    """A controller whose ``score`` fails with lost inputs the first ``fails`` times."""

    groups: dict = {}  # no actor is dead: replace_dead finds none

    def __init__(self, fails: int):
        self.fails, self.calls = fails, []

    def remake_lost(self, gen):
        self.calls.append(("remake", gen["step"]))

    @recoverable
    def score(self, gen, records):
        self.calls.append(("score", gen["step"]))
        if self.fails:
            self.fails -= 1
            raise WorkerError("reward score: Ray lost its input objects", "reward", lost=True)
        return "scored"


def test_lost_inputs_are_remade_before_the_call_runs_again():
    c = Scripted(fails=2)
    assert c.score({"step": 7, "shards": []}, []) == "scored"
    assert c.calls == [("score", 7), ("remake", 7), ("score", 7), ("remake", 7), ("score", 7)]


def test_inputs_lost_again_and_again_end_in_the_error():
    c = Scripted(fails=LOST_RETRIES + 1)
    with pytest.raises(WorkerError, match="Ray lost its input objects") as err:
        c.score({"step": 1, "shards": []}, [])
    assert err.value.lost and c.calls.count(("remake", 1)) == LOST_RETRIES


def test_an_error_that_is_not_a_loss_is_not_retried():
    class Broken(Scripted):
        @recoverable
        def score(self, gen, records):
            self.calls.append(("score", gen["step"]))
            raise WorkerError("reward score failed: KeyError: 'answer'", "reward")

    c = Broken(fails=0)
    with pytest.raises(WorkerError, match="KeyError"):
        c.score({"step": 2, "shards": []}, [])
    assert c.calls == [("score", 2)]
