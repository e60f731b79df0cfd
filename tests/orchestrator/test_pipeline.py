"""The rollout pipeline's bookkeeping (orchestrator/pipeline.py) against a scripted controller:
which weight version each step trains on, what is regenerated, discarded, checkpointed and
restored. The real stack runs it in tests/integration (resume, hybrid runs, an engine dying)."""

from types import SimpleNamespace

import pytest

from core.errors import RecipeError
from orchestrator.metrics import Timings
from orchestrator.pipeline import RolloutPipeline, check_schedule
from orchestrator.schedules import RL, build_schedule
from workers.types import Rollouts


class Scripted:
    """The controller calls the pipeline makes, with engines that generate under the version
    current when a generation was submitted (as a Ray actor's ordered queue makes them)."""

    def __init__(self, k: int, steps: int = 10, wants=lambda s: True):
        self.recipe = SimpleNamespace(rollout=SimpleNamespace(max_staleness=k), steps=steps)
        self.schedule = SimpleNamespace(wants_rollouts=wants)
        self.version, self.drawn, self.submitted = 0, [], []

    def next_batch(self, step):
        self.drawn.append(step)
        return [{"id": f"p{step}"}], {"data/step": float(step)}

    def submit_generation(self, batch, step):
        self.submitted.append((step, self.version))
        return [("pair", self.version, step)]

    def collect_generation(self, pairs):
        _, version, step = pairs[0]
        r = Rollouts([0], [[1]], [[2]], [[-1.0]], [f"s{step}"], ["stop"], version)
        return {"prompt_index": [0], "lengths": [1], "truncated": [False],
                "texts": r.texts, "weight_version": version, "refs": [r]}

    def generate(self, batch, step):
        return self.collect_generation(self.submit_generation(batch, step))

    def score(self, gen, batch, step):
        return f"scores of {gen['texts'][0]}"

    def fetch_rollouts(self, gen):
        return Rollouts.gather(gen["refs"])

    def step(self, pipe, step, syncs=1):
        out = pipe.take(step, Timings())
        self.version += syncs
        return out


def test_lockstep_generates_each_step_under_the_current_weights():
    c = Scripted(k=0)
    pipe = RolloutPipeline(c)
    for step in (1, 2, 3):
        batch, metrics, gen = c.step(pipe, step)
        assert batch == [{"id": f"p{step}"}] and gen["weight_version"] == step - 1
        assert "rollout/staleness" not in metrics and gen["scores"] == f"scores of s{step}"
    assert c.drawn == [1, 2, 3] and pipe.ahead == {}


@pytest.mark.parametrize("k", [1, 2])
def test_k_steps_ahead_train_on_weights_k_syncs_old(k):
    c = Scripted(k=k, steps=6)
    pipe = RolloutPipeline(c)
    stale = []
    for step in range(1, 7):
        _, metrics, gen = c.step(pipe, step)
        stale.append(metrics["rollout/staleness"])
        assert gen["weight_version"] == max(step - 1 - k, 0)
    assert stale == [min(s, k) for s in range(6)]
    assert c.drawn == list(range(1, 7))  # prompts drawn in step order, none past the last step
    assert pipe.ahead == {} and pipe.regenerated == pipe.discarded == 0


def test_a_step_that_syncs_twice_makes_the_next_rollouts_too_old():
    c = Scripted(k=1)
    pipe = RolloutPipeline(c)
    c.step(pipe, 1, syncs=2)  # step 2's rollouts were submitted under version 0, now 2
    _, metrics, gen = c.step(pipe, 2)
    assert gen["weight_version"] == 2 and metrics["rollout/staleness"] == 0
    assert metrics["rollout/regenerated_total"] == 1


def test_rollouts_a_schedule_no_longer_wants_are_discarded():
    wanted = {1: True, 2: True}
    c = Scripted(k=1, wants=lambda s: wanted.get(s, True))
    pipe = RolloutPipeline(c)
    c.step(pipe, 1)
    wanted[2] = False  # decided after step 2's generation was submitted
    _, metrics, gen = c.step(pipe, 2)
    assert gen is None and pipe.discarded == 1
    _, metrics, _ = c.step(pipe, 3)
    assert metrics["rollout/discarded_total"] == 1


def test_steps_in_flight_survive_a_checkpoint_and_a_smaller_k_regenerates_them(tmp_path):
    c = Scripted(k=1)
    pipe = RolloutPipeline(c)
    c.step(pipe, 1)
    c.step(pipe, 2)  # step 3 in flight, generated under version 1
    pipe.save(tmp_path)
    assert pipe.ahead[3].gen["scores"] == "scores of s3"  # fetched and scored for the save

    resumed = Scripted(k=1)
    resumed.version = 2
    again = RolloutPipeline(resumed)
    again.load(tmp_path)
    _, metrics, gen = resumed.step(again, 3)
    assert resumed.submitted == [(4, 2)]  # only step 4, handed out at step 3; 3 was restored
    assert gen["weight_version"] == 1 and metrics["rollout/staleness"] == 1
    assert gen["scores"] == "scores of s3" and gen["refs"][0].texts == ["s3"]
    assert metrics["data/step"] == 3.0 and resumed.drawn == [4]

    lockstep = Scripted(k=0)
    lockstep.version = 2
    strict = RolloutPipeline(lockstep)
    strict.load(tmp_path)
    _, metrics, gen = lockstep.step(strict, 3)
    assert gen["weight_version"] == 2 and strict.regenerated == 1


def test_lockstep_checkpoints_write_no_inflight_file(tmp_path):
    c = Scripted(k=0)
    pipe = RolloutPipeline(c)
    c.step(pipe, 1)
    pipe.save(tmp_path)
    assert not (tmp_path / RolloutPipeline.FILE).exists()


class OnPolicy(RL):
    max_staleness = 0


def test_a_schedule_states_the_staleness_it_tolerates():
    check_schedule(RL(), 4, "rl")
    check_schedule(OnPolicy(), 0, "x")
    with pytest.raises(RecipeError, match="at most 0 weight version"):
        check_schedule(OnPolicy(), 1, "x")
    phases = build_schedule("phases", {"phases": [
        {"policy": "sft", "steps": 2},
        {"policy": "tests.orchestrator.test_pipeline:OnPolicy", "steps": 2}]})
    with pytest.raises(RecipeError, match="'phases' decides on rollouts at most 0"):
        check_schedule(phases, 1, "phases")
