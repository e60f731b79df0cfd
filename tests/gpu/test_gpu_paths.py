"""GPU-only paths: the same worker classes with NCCL, upstream vLLM and DeepSpeed on CUDA.

Run with `pytest -m gpu tests/gpu` on a machine with CUDA GPUs (they are deselected by default
and skip without CUDA). The workers are driven directly, without Ray, as a GPU machine without
the Ray wheel would run them.
"""

import multiprocessing as mp
import os

import pytest
import torch

pytestmark = pytest.mark.gpu

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_two = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
needs_three = pytest.mark.skipif(torch.cuda.device_count() < 3, reason="needs 3 CUDA GPUs")


def _nccl_receiver(port, manifest, q):
    from core.weight_sync import Manifest, SyncGroup, WeightReceiver

    torch.cuda.set_device(1)
    recv = WeightReceiver(Manifest.from_dict(manifest),
                          SyncGroup("127.0.0.1", port, 2, 1, "nccl", 120))
    v, state = recv.receive(expected_version=7)
    q.put((v, {n: t.cpu() for n, t in state.items()}))


@needs_two
def test_nccl_bucketed_sync_between_two_gpus():
    from core.weight_sync import SyncGroup, WeightSender, free_port, plan_buckets

    state = {f"w{i}": torch.randn(256, 64 * (i + 1), device="cuda:0") for i in range(5)}
    manifest = plan_buckets([(n, tuple(t.shape), t.dtype) for n, t in state.items()], 1 << 18)
    port, ctx = free_port(), mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_nccl_receiver, args=(port, manifest.to_dict(), q))
    p.start()
    torch.cuda.set_device(0)
    WeightSender(manifest, SyncGroup("127.0.0.1", port, 2, 0, "nccl", 120)).send(7, state)
    version, got = q.get(timeout=120)
    p.join(timeout=60)
    assert version == 7
    for n, t in state.items():
        assert torch.equal(got[n], t.cpu())


def _nccl_dying_receiver(port, manifest):
    from core.weight_sync import Manifest, SyncGroup, _header

    torch.cuda.set_device(1)
    m = Manifest.from_dict(manifest)
    group = SyncGroup("127.0.0.1", port, 2, 1, "nccl", 10)
    group.broadcast(_header(-1, m, group.device))  # takes the header, then dies mid-sync
    torch.cuda.synchronize()
    os._exit(1)


@needs_two
def test_nccl_sync_to_a_dead_engine_fails_within_the_timeout():
    """An engine that dies mid-sync ends the sender's broadcast within weight_sync.timeout_s
    with an error (the same recovery as gloo), not a hang."""
    import time

    from core.weight_sync import SyncGroup, WeightSender, free_port, plan_buckets

    state = {f"w{i}": torch.randn(1024, 1024, device="cuda:0") for i in range(4)}
    manifest = plan_buckets([(n, tuple(t.shape), t.dtype) for n, t in state.items()], 1 << 22)
    port, ctx = free_port(), mp.get_context("spawn")
    p = ctx.Process(target=_nccl_dying_receiver, args=(port, manifest.to_dict()))
    p.start()
    torch.cuda.set_device(0)
    sender = WeightSender(manifest, SyncGroup("127.0.0.1", port, 2, 0, "nccl", 10))
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="weight sync broadcast failed"):
        for _ in range(20):  # NCCL may buffer a send or two before the peer is missed
            sender.send(8, state)
            torch.cuda.synchronize()
    assert time.monotonic() - t0 < 60
    p.join(timeout=60)


@needs_cuda
def test_deepspeed_learner_on_cuda_world_one(make_recipe):
    from core.weight_sync import free_port
    from workers.base import WorkerContext
    from workers.learner.deepspeed import DeepSpeedLearner

    recipe = make_recipe(**{"roles.learner.replicas": 1, "roles.learner.resources":
                            {"num_cpus": 1, "num_gpus": 1}})
    args = DeepSpeedLearner.check_args({"zero_stage": 3}, "roles.learner.args")
    w = DeepSpeedLearner(WorkerContext("learner", 0, 1, recipe, args))
    os.environ.pop("DS_ACCELERATOR", None)
    w.setup(master_addr="127.0.0.1", master_port=free_port())
    from workers.learner.terms import SFT

    m = w.update([SFT(prompts=[[1, 5, 6, 14]] * 4, completions=[[7, 2]] * 4)])
    assert m["sft/loss"] > 0 and m["sft/grad_norm"] > 0
    state = w.full_state_dict()
    assert all(t.is_cuda for t in state.values())


@needs_cuda
def test_lora_learner_on_cuda_world_one(make_recipe, tmp_path):
    """LoRA adapters in bf16 on the adapters' default ZeRO stage (0): an SFT step trains only
    the adapters, the reference (adapters disabled) is the base model, the merged weights and
    the adapter folder come out."""
    from core.weight_sync import free_port
    from workers.base import WorkerContext
    from workers.learner.deepspeed import DeepSpeedLearner
    from workers.learner.terms import SFT
    from workers.types import Rollouts

    recipe = make_recipe(**{"roles.learner.replicas": 1, "roles.learner.resources":
                            {"num_cpus": 1, "num_gpus": 1}, "model.dtype": "bfloat16",
                            "model.lora": {"rank": 8, "alpha": 16}, "algorithm.lr": 1e-2})
    args = DeepSpeedLearner.check_args({}, "roles.learner.args")
    w = DeepSpeedLearner(WorkerContext("learner", 0, 1, recipe, args))
    os.environ.pop("DS_ACCELERATOR", None)
    w.setup(master_addr="127.0.0.1", master_port=free_port())
    assert w.zero_stage == 0
    r = Rollouts([0], [[1, 5, 6, 14]], [[7, 2]], [[]], [""], ["stop"])
    before = w.reference_logprobs(r)
    base = w.full_state_dict()
    for _ in range(3):
        m = w.update([SFT(prompts=[[1, 5, 6, 14]] * 4, completions=[[7, 2]] * 4)])
    assert m["sft/loss"] > 0 and m["sft/grad_norm"] > 0
    assert w.reference_logprobs(r) == before  # the base model did not move
    merged = w.full_state_dict()
    assert set(merged) == set(base) and any(not torch.equal(merged[k], base[k]) for k in base)
    w.save_adapter(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@needs_cuda
def test_deepspeed_critic_on_cuda_world_one(make_recipe):
    """PPO's critic on CUDA: values for every completion token, a clipped value-loss step."""
    from core.weight_sync import free_port
    from workers.base import WorkerContext
    from workers.learner.critic import DeepSpeedCritic
    from workers.types import Rollouts

    critic = {"cls": "workers.learner.critic:DeepSpeedCritic",
              "resources": {"num_cpus": 1, "num_gpus": 1}}
    recipe = make_recipe(**{"roles.critic": critic, "algorithm.advantage": "gae"})
    args = DeepSpeedCritic.check_args({"zero_stage": 3}, "roles.critic.args")
    w = DeepSpeedCritic(WorkerContext("critic", 0, 1, recipe, args))
    os.environ.pop("DS_ACCELERATOR", None)
    w.setup(master_addr="127.0.0.1", master_port=free_port())
    r = Rollouts([0, 0], [[1, 5, 6], [1, 5, 6]], [[8, 9, 2], [4]], [[], []], ["", ""],
                 ["stop", "stop"])
    values = w.values(r)
    assert [len(v) for v in values] == [3, 1]
    from workers.learner.terms import Value

    m = w.update([Value(rollouts=r, returns=[[1.0] * 3, [0.0]], old_values=values)])
    assert m["value/loss"] > 0 and m["critic/grad_norm"] > 0 and m["critic/updates"] == 1.0


@needs_three
@pytest.mark.parametrize("engine", ["workers.rollout.vllm:VLLMRollout",
                                    "workers.rollout.vllm_async:AsyncVLLMRollout"])
def test_tensor_parallel_engine_takes_synced_weights(ray_local, make_chat_recipe, engine):
    """A vLLM engine with tensor_parallel_size 2 inside its rollout actor (vLLM's
    multiprocessing executor on the actor's 2 GPUs) joins the NCCL sync group with both
    workers; after an SFT step and a sync its greedy output is the learner's (the CPU test's
    check, on GPUs, with bf16 log-prob tolerance left to the CPU test). Also vLLM's
    asynchronous engine."""
    pytest.importorskip("vllm")
    from tests.integration.test_weight_sync_vllm import check_sync

    recipe = make_chat_recipe(**{
        "roles.rollout.cls": engine,
        "roles.rollout.resources": {"num_cpus": 1, "num_gpus": 2},
        "roles.rollout.args.tensor_parallel_size": 2,
        "roles.rollout.args.gpu_memory_utilization": 0.3,
        "roles.learner.replicas": 1, "roles.learner.resources": {"num_cpus": 1, "num_gpus": 1},
        "algorithm.lr": 5e-2, "algorithm.sft_lr": 5e-2, "weight_sync.bucket_mb": 0.05})
    check_sync(recipe, big_batch=False)
