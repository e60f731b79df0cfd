"""The reference worker driven in a plain process: its log-probs are those of the initial
weights for exactly the completion tokens, at the sampling temperature."""

import torch

from workers.base import WorkerContext
from workers.reference import HFReference
from workers.types import Rollouts


def test_reference_logprobs_match_a_direct_forward(make_recipe):
    from transformers import AutoModelForCausalLM

    recipe = make_recipe(**{"sampling.temperature": 0.7,
                            "roles.reference": {"cls": "workers.reference:HFReference"},
                            "algorithm.kl": 0.05})
    args = HFReference.check_args({"micro_batch_size": 2}, "roles.reference.args")
    w = HFReference(WorkerContext("reference", 0, 1, recipe, args))
    w.setup()
    r = Rollouts([0, 0, 1], [[1, 5, 6], [1, 5, 6], [1, 7]], [[8, 2], [9], [10, 11, 2]],
                 [[], [], []], ["", "", ""], ["stop"] * 3)
    got = w.logprobs(r)
    assert [len(x) for x in got] == [2, 1, 3]
    # two replicas each take a slice; concatenated, the slices are the whole (packed with
    # other rows, a row's values move by float noise only)
    halves = w.logprobs(r, shard=(0, 2)) + w.logprobs(r, shard=(1, 2))
    assert [len(x) for x in halves] == [2, 1, 3]
    for a, b in zip(halves, got):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(recipe.model.path).eval()
    for p, c, lp in zip(r.prompt_ids, r.completion_ids, got):
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logits = model(ids).logits[0, len(p) - 1:-1] / 0.7
        expect = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(lp), expect, rtol=1e-4, atol=1e-5)
