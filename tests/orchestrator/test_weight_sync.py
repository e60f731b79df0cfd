import io
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


def _as_bytes(obj) -> bytes:
    """Tensors through a queue by value: shared-memory handles die with the child process."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes):
    return torch.load(io.BytesIO(data))


def _receiver(port, world, rank, manifest, q):
    group = SyncGroup("127.0.0.1", port, world, rank, "gloo", timeout_s=60)
    recv = WeightReceiver(Manifest.from_dict(manifest), group)
    out = []
    for v in (1, 2):
        out.append(recv.receive(expected_version=v))
    q.put(_as_bytes(out))


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
    results = [_from_bytes(q.get(timeout=60)) for _ in procs]
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


def _streaming_receiver(port, manifest, q):
    group = SyncGroup("127.0.0.1", port, 2, 1, "gloo", timeout_s=60)
    recv = WeightReceiver(Manifest.from_dict(manifest), group)
    got = []
    for v in (1, 2):
        assert recv.begin(expected_version=v) == v
        # a loader that copies each tensor before asking for the next may take views
        got.append({n: t.clone() for n, t in recv.tensors(copy=False)})
        assert recv.done
    q.put(_as_bytes((got, recv.buffers.nbytes)))


def test_many_buckets_stream_through_a_pair_of_buffers():
    """Sender and receiver hold two bucket-sized buffers, not the model: 40 tensors in ~10
    multi-tensor buckets arrive intact, twice, with the next bucket posted while one loads."""
    g = torch.Generator().manual_seed(1)
    p = {f"w{i}": torch.randn(3 + i % 7, 5, generator=g) for i in range(40)}
    manifest = plan_buckets([(n, tuple(t.shape), t.dtype) for n, t in p.items()], 512)
    assert len(manifest.buckets) >= 8 and max(len(b.tensors) for b in manifest.buckets) > 1
    port, ctx = free_port(), mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_streaming_receiver, args=(port, manifest.to_dict(), q))
    proc.start()
    sender = WeightSender(manifest, SyncGroup("127.0.0.1", port, 2, 0, "gloo", 60))
    sender.send(1, p)
    p2 = {n: -t for n, t in p.items()}
    sender.send(2, p2)
    got, receiver_bytes = _from_bytes(q.get(timeout=60))
    proc.join(timeout=30)
    assert proc.exitcode == 0
    for state, expect in zip(got, (p, p2)):
        assert list(state) == list(expect)
        for n in expect:
            assert torch.equal(state[n], expect[n])
    sizes = [b.numel * 4 for b in manifest.buckets]
    assert receiver_bytes == max(sizes[0::2]) + max(sizes[1::2]) < manifest.nbytes / 4
    # the sender broadcasts a one-tensor bucket from the tensor itself: no buffer for it
    multi = [n if len(b.tensors) > 1 else 0 for n, b in zip(sizes, manifest.buckets)]
    assert sender.buffers.nbytes == max(multi[0::2]) + max(multi[1::2]) <= receiver_bytes


def _dying_receiver(port, manifest, rank, q):
    """Rank 2 dies after the header (an engine lost mid-sync); rank 1 reports how long its
    receive took to fail."""
    import os
    import time

    group = SyncGroup("127.0.0.1", port, 3, rank, "gloo", timeout_s=60)
    recv = WeightReceiver(Manifest.from_dict(manifest), group)
    recv.begin(expected_version=1)
    if rank == 2:
        os._exit(1)
    t0 = time.monotonic()
    try:
        for _ in recv.tensors(copy=False):
            pass
        q.put(("received", time.monotonic() - t0))
    except Exception as err:
        q.put((type(err).__name__, time.monotonic() - t0))


def test_a_failed_send_releases_the_engines_still_receiving_at_once():
    """An engine dies mid-sync: the sender's broadcast fails, and closing its group makes the
    surviving engine's receive fail within seconds, not after the group's 60 s timeout."""
    import pytest

    p = {f"w{i}": torch.zeros(1_000_000) for i in range(8)}  # 32 MB: more than socket buffers
    manifest = plan_buckets([(n, tuple(t.shape), t.dtype) for n, t in p.items()], 1 << 20)
    port, ctx = free_port(), mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_dying_receiver, args=(port, manifest.to_dict(), r, q))
             for r in (1, 2)]
    for pr in procs:
        pr.start()
    sender = WeightSender(manifest, SyncGroup("127.0.0.1", port, 3, 0, "gloo", 60))
    with pytest.raises(RuntimeError):
        sender.send(1, p)
    sender.close()
    outcome, seconds = q.get(timeout=60)
    for pr in procs:
        pr.join(timeout=30)
    assert outcome == "RuntimeError" and seconds < 20, (outcome, seconds)
