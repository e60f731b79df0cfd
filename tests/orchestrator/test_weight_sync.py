import multiprocessing as mp

import torch

from core.weight_sync import (
    Manifest,
    SyncGroup,
    WeightReceiver,
    WeightSender,
    free_port,
    plan_buckets,
)


def _params():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(3, 4, generator=g), "b": torch.randn(100, generator=g),
            "c": torch.randn(2, 2, generator=g).to(torch.bfloat16),
            "d": torch.randn(5, 5, generator=g)}


def test_plan_buckets_respects_size_dtype_and_order():
    p = _params()
    m = plan_buckets([(n, tuple(t.shape), t.dtype) for n, t in p.items()], bucket_bytes=256)
    names = [[t.name for t in b.tensors] for b in m.buckets]
    assert names == [["a"], ["b"], ["c"], ["d"]]  # b alone exceeds 256 B; c is bf16
    m2 = plan_buckets([(n, tuple(t.shape), t.dtype) for n, t in p.items()], bucket_bytes=1 << 20)
    assert [[t.name for t in b.tensors] for b in m2.buckets] == [["a", "b"], ["c"], ["d"]]
    assert m2.num_tensors == 4 and m2.nbytes == (12 + 100 + 25) * 4 + 4 * 2
    assert Manifest.from_dict(m2.to_dict()) == m2


def _receiver(port, world, rank, manifest, q):
    group = SyncGroup("127.0.0.1", port, world, rank, "gloo", timeout_s=60)
    recv = WeightReceiver(Manifest.from_dict(manifest), group)
    out = []
    for v in (1, 2):
        got = recv.receive(expected_version=v)
        out.append((got, {n: t.clone() for n, t in recv.named_tensors()}))
    q.put(out)


def test_bucketed_broadcast_reaches_every_receiver_with_versions():
    p = _params()
    manifest = plan_buckets([(n, tuple(t.shape), t.dtype) for n, t in p.items()], 256)
    port, world = free_port(), 3
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_receiver, args=(port, world, r, manifest.to_dict(), q))
             for r in (1, 2)]
    for pr in procs:
        pr.start()
    sender = WeightSender(manifest, SyncGroup("127.0.0.1", port, world, 0, "gloo", 60))
    sender.send(1, p)
    p2 = {n: t * 2 for n, t in p.items()}
    sender.send(2, p2)
    results = [q.get(timeout=60) for _ in procs]
    for pr in procs:
        pr.join(timeout=30)
        assert pr.exitcode == 0
    for out in results:
        assert [v for v, _ in out] == [1, 2]
        for (_, tensors), expect in zip(out, (p, p2)):
            assert tensors.keys() == expect.keys()
            for n in expect:
                assert tensors[n].dtype == expect[n].dtype
                assert torch.equal(tensors[n], expect[n])
