"""Rollouts' per-sample weight versions: how engines' outputs fill them, and how they travel
through concat, shard and pickles written before they existed."""

import pickle
from types import SimpleNamespace

from workers.rollout.vllm import VLLMRollout
from workers.types import Rollouts


def rollouts(version: int, versions: list, n: int = 2) -> Rollouts:
    return Rollouts(list(range(n)), [[1]] * n, [[5]] * n, [[-0.1]] * n, ["x"] * n,
                    ["stop"] * n, version, versions)


def test_concat_keeps_each_samples_versions_and_the_oldest():
    a = rollouts(3, [(3, 3), (3, 4)])
    b = rollouts(4, [])  # an engine that reports none: all its samples at its version
    out = Rollouts.concat([a, b])
    assert out.weight_version == 3
    assert out.versions == [(3, 3), (3, 4), (4, 4), (4, 4)]
    part, first = out.shard(1, 2)
    assert first == 2 and part.versions == [(4, 4), (4, 4)] and part.weight_version == 3


def test_rollouts_pickled_before_versions_load():
    r = rollouts(2, [(2, 2), (2, 2)])
    state = dict(r.__dict__)
    del state["versions"]
    old = Rollouts.__new__(Rollouts)
    old.__setstate__(state)
    assert old.versions == [] and old.shard(0, 2)[0].completion_ids == [[5]]
    assert pickle.loads(pickle.dumps(r)).versions == [(2, 2), (2, 2)]


def test_engine_outputs_give_first_and_last_version():
    """vLLM labels spans of tokens with the engine's weight version: braid's numbers, or
    "default" on an engine never labelled (the synchronous one: its own version)."""
    def out(spans):
        c = SimpleNamespace(token_ids=[7, 8, 9], logprobs=[{7: SimpleNamespace(logprob=-1.0)},
                                                            {8: SimpleNamespace(logprob=-2.0)},
                                                            {9: SimpleNamespace(logprob=-3.0)}],
                            text="abc", finish_reason="length",
                            weight_versions=[SimpleNamespace(version=v) for v in spans])
        return SimpleNamespace(prompt_token_ids=[1, 2], outputs=[c])

    worker = VLLMRollout.__new__(VLLMRollout)
    worker.version = 5
    summary, r = worker.rollouts([out(["4", "5"]), out(["default"]), out([])], True, 10)
    assert r.versions == [(4, 5), (5, 5), (5, 5)] and r.weight_version == 4
    assert summary["spanning"] == 1 and summary["weight_version"] == 4
    assert r.prompt_index == [10, 11, 12] and r.logprobs[0] == [-1.0, -2.0, -3.0]
