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
    return {"prompt_index": [0, 0, 0, 1, 1, 1], "refs": [], "scores": Scores(rewards=rewards),
            "lengths": [3] * 6}


BATCH = [{"id": "a", "prompt": "1+1="}, {"id": "b", "prompt": "2+2="}]


def test_unscored_samples_count_as_zero_by_default(make_recipe):
    c = _controller(make_recipe)
    (term,) = rl_terms(c, RLUpdate(), BATCH, _gen([1.0, None, 0.0, 1.0, 1.0, 0.0]), step=1)
    assert term.select is None
    adv = term.advantages
    assert adv[1] == pytest.approx(adv[2])  # None scored like the 0.0 beside it
    assert adv[0] > 0 > adv[1]


def test_dropped_samples_leave_the_update_and_the_baseline(make_recipe):
    c = _controller(make_recipe, unscored="drop")
    (term,) = rl_terms(c, RLUpdate(), BATCH, _gen([1.0, None, 0.0, 1.0, 1.0, 0.0]), step=1)
    assert term.select == [0, 2, 3, 4, 5]
    adv = term.advantages
    assert adv[1] == 0.0
    # prompt a's baseline is the mean of 1.0 and 0.0 only: symmetric advantages
    assert adv[0] == pytest.approx(-adv[2]) and adv[0] > 0
    everything_unscored = _gen([None] * 6)
    assert rl_terms(c, RLUpdate(), BATCH, everything_unscored, step=1) == []


class CharPrompts:
    """Prompt formatting by character codes: enough for the update's own logic."""

    def prompt_ids(self, record):
        return [ord(ch) for ch in record["prompt"]]

    def completion_ids(self, text):
        return [ord(ch) for ch in text]

    def strip_prefix(self, text):
        return text

    def demonstration(self, record):
        return self.completion_ids(record["demonstration"]), None


@pytest.mark.parametrize("unscored", ["zero", "drop"])
def test_an_unscorable_demonstration_follows_scoring_unscored(make_recipe, unscored):
    """LUFFY's demonstrations join their groups scored by the verifier; one it cannot score is
    0 under ``unscored: zero`` and leaves the update (and its group's baseline) under drop."""
    c = _controller(make_recipe, unscored=unscored)
    c.prompts = CharPrompts()
    c.demos.add([dict(BATCH[0], demonstration="2"), dict(BATCH[1], demonstration="4")])
    c.score_texts = lambda records, texts: [None if r["id"] == "a" else 1.0 for r in records]
    pg, off = rl_terms(c, RLUpdate(demos_in_group=True), BATCH,
                       _gen([1.0, 0.0, 0.0, 1.0, 1.0, 0.0]), step=1)
    assert pg.joint == off.joint == "luffy"
    if unscored == "drop":
        assert off.completions == [[ord("4")]]  # a's demonstration left the update
        assert c.demos.metrics()["demos/used"] == 1.0  # and is not counted as used
        # a's group is its three samples alone: mean 1/3, sample std 0.577
        assert pg.advantages[0] == pytest.approx((1 - 1 / 3) / 0.57735, rel=1e-4)
    else:
        assert off.completions == [[ord("2")], [ord("4")]]
        # a's group has four members, the demonstration scored 0: mean 1/4, std 1/2
        assert pg.advantages[0] == pytest.approx(1.5, rel=1e-4)
        assert off.advantages[0] == pytest.approx(-0.5, rel=1e-4)


def test_too_many_unscored_samples_stop_the_run(make_recipe):
    c = _controller(make_recipe, max_unscored_frac=0.5)
    c.check_unscored(1, Scores(rewards=[None, None, None, 1.0, 0.0, 1.0]))  # 50%: allowed
    scores = Scores(rewards=[None] * 4 + [1.0, 0.0], failures={"exact_answer": 4},
                    failed_ids=["a#0", "a#1", "a#2", "b#0"])
    with pytest.raises(WorkerError, match=r"step 7: 4 of 6 samples could not be scored .*"
                       r"exact_answer.*a#0.*scoring.max_unscored_frac=0.5"):
        c.check_unscored(7, scores)


def test_rejection_sampling_picks_accepted_distinct_samples(make_recipe):
    """RFT's SFT term: this step's own samples with reward >= threshold, the first
    ``per_prompt`` distinct non-empty texts of each prompt."""
    from orchestrator.schedules import SFTUpdate
    from orchestrator.updates import samples_term

    gen = _gen([1.0, 1.0, 1.0, 0.0, None, 1.0]) | {
        "texts": ["2", "2", "02", "5", "4", ""], "lengths": [1, 1, 2, 1, 1, 0]}
    term = samples_term(SFTUpdate(source="samples"), BATCH, gen)
    assert type(term).__name__ == "SampleSFT" and term.select == [0]  # b: 0.0, unscored, empty
    assert samples_term(SFTUpdate(source="samples", per_prompt=2), BATCH, gen).select == \
        [0, 2]  # "2" twice counts once
    assert samples_term(SFTUpdate(source="samples", threshold=2.0), BATCH, gen) is None
    # trajectories ending in the same answer after different turns are distinct
    traj = gen | {"keys": [11, 12, 13, 14, 15, 16]}
    assert samples_term(SFTUpdate(source="samples", per_prompt=2), BATCH, traj).select == \
        [0, 1]
    assert samples_term(SFTUpdate(source="samples", ids=("b",)), BATCH, gen) is None


def test_dynamic_sampling_trains_on_the_kept_groups_only(make_recipe):
    c = _controller(make_recipe)
    gen = _gen([1.0, 0.0, 0.0, 1.0, 1.0, 0.0]) | {"train_prompts": {1}}
    (term,) = rl_terms(c, RLUpdate(), BATCH, gen, step=1)
    assert term.select == [3, 4, 5]


def test_groups_with_signal():
    from orchestrator.controller import groups_with_signal

    gen = {"prompt_index": [0, 0, 1, 1, 2, 2, 3],
           "scores": Scores(rewards=[1.0, 0.0, 1.0, None, 0.0, None, 1.0])}
    # prompt 1: {1, None} differs as {1, 0}, not when None is dropped; prompt 2 {0, None}
    # equal either way; prompt 3: a group of one (kept, as verl)
    assert groups_with_signal(gen, drop_unscored=False) == [0, 1, 3]
    assert groups_with_signal(gen, drop_unscored=True) == [0, 3]


def test_extra_generations_take_prompt_indices_and_seeds_after_the_first(make_recipe):
    """Dynamic sampling's second batch: its prompts' indices (what the reward worker looks
    records up by) and sampling seeds follow the first batch's."""
    from orchestrator.groups import WorkerGroup

    calls = []

    class Method:
        def options(self, num_returns):
            return self

        def remote(self, shard, *args, index_offset):
            calls.append(([it["seed"] for it in shard], index_offset))
            return ("summary", "rollouts")

    class Actor:
        generate = Method()

    c = _controller(make_recipe)
    c.prompts = CharPrompts()
    c.prompts.stop_token_ids = []
    c.rollout = WorkerGroup.__new__(WorkerGroup)
    c.rollout.actors, c.rollout.role = [Actor(), Actor()], "rollout"
    shards = c.submit_generation(BATCH, step=3)
    # each engine's share keeps what it was asked, to ask again should Ray lose its rollouts
    assert [(s.rank, s.offset, len(s.items)) for s in shards] == [(0, 0, 1), (1, 1, 1)]
    assert [s.items[0]["seed"] for s in shards] == calls[0][0] + calls[1][0]
    first = list(calls)
    calls.clear()
    c.submit_generation(BATCH, step=3, offset=2)
    assert [off for _, off in first] == [0, 1] and [off for _, off in calls] == [2, 3]
    seeds = [s for part, _ in first + calls for s in part]
    assert len(set(seeds)) == 4


def test_generations_merge_with_their_trajectory_counts_and_masks():
    """Dynamic sampling's extra batches join the first with merge_summaries: trajectories'
    counters add up and their loss masks (what GAE runs over) follow their samples."""
    from orchestrator.controller import merge_summaries

    a = {"prompt_index": [0, 0], "lengths": [2, 1], "truncated": [False, True],
         "texts": ["x", "y"], "weight_version": 3, "spanning": 0,
         "agent": {"samples": 2.0, "turns": 4.0}, "masks": [[1, 0, 1], [1]], "keys": [7, 8]}
    b = {"prompt_index": [2, 2], "lengths": [1, 2], "truncated": [False, False],
         "texts": ["z", "w"], "weight_version": 2, "spanning": 1,
         "agent": {"samples": 2.0, "turns": 2.0, "tool_calls": 1.0}, "masks": [[1], [1, 1]],
         "keys": [9, 7]}
    m = merge_summaries([a, b])
    assert m["prompt_index"] == [0, 0, 2, 2] and m["texts"] == ["x", "y", "z", "w"]
    assert m["masks"] == [[1, 0, 1], [1], [1], [1, 1]]
    assert m["keys"] == [7, 8, 9, 7]
    assert m["agent"] == {"samples": 4.0, "turns": 6.0, "tool_calls": 1.0}
    assert (m["weight_version"], m["spanning"]) == (2, 1)
