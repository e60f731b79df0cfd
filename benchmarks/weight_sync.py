"""Weight sync against its floor, measured in one run.

    .venv/bin/python benchmarks/weight_sync.py [--model gpt2-small|tiny] [--bucket-mb 64]

Two processes (sender = learner rank 0, receiver = one rollout engine) on braid's gloo sync
group. For a state dict of a given shape it times, medians over repeats:

- floor:      one broadcast of all the bytes from one pre-allocated flat buffer into another;
- braid:      WeightSender / WeightReceiver — copy each bucket's tensors into one of a pair
              of bucket-sized buffers and broadcast it while the next is copied (a bucket of
              one tensor goes as it is); the receiver posts the next bucket's broadcast, then
              hands out a copy of each tensor (what vLLM's layer-by-layer reload needs);
- per-tensor: one broadcast per tensor, in place (the shape of OpenRLHF's per-parameter sync,
              without its RPC per parameter).

It prints each time and its ratio to the floor, and the memory the sync holds on each side
between syncs (the pair of buffers) against the state's size. DeepSpeed's ZeRO-3 gather and vLLM's
reload are not part of this measurement (they cost the same under either transport).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core.weight_sync import (  # noqa: E402
    SyncGroup,
    WeightReceiver,
    WeightSender,
    free_port,
    plan_buckets,
)

SHAPES = {
    # GPT-2 small: 149 tensors, 124M parameters (~500 MB fp32)
    "gpt2-small": [(50257, 768), (1024, 768)] + [s for _ in range(12) for s in
                                                   [(768,), (768,), (768, 2304), (2304,),
                                                    (768, 768), (768,), (768,), (768,),
                                                    (768, 3072), (3072,), (3072, 768), (768,)]]
    + [(768,), (768,)],
    "tiny": [(59, 128)] + [(128, 128)] * 8 + [(128, 256)] * 6 + [(128,)] * 5,
}


def make_state(name: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(*s, generator=g) for i, s in enumerate(SHAPES[name])}


def run(role: int, port: int, shapes: str, bucket_mb: float, repeats: int, q):
    state = make_state(shapes)
    manifest = plan_buckets([(n, tuple(t.shape), t.dtype) for n, t in state.items()],
                            int(bucket_mb * 2**20))
    group = SyncGroup("127.0.0.1", port, 2, role, "gloo", timeout_s=300)
    total = sum(t.numel() for t in state.values())
    flat = torch.zeros(total)
    times: dict[str, list[float]] = {"floor": [], "braid": [], "per-tensor": []}
    sender = WeightSender(manifest, group) if role == 0 else None
    receiver = WeightReceiver(manifest, group) if role == 1 else None
    for r in range(repeats + 1):  # the first round warms up and is dropped
        group.broadcast(torch.zeros(1))  # align both processes before each measurement
        t0 = time.perf_counter()
        group.broadcast(flat)
        t_floor = time.perf_counter() - t0

        group.broadcast(torch.zeros(1))
        t0 = time.perf_counter()
        if sender:
            sender.send(r + 1, state)
        else:
            receiver.begin(expected_version=r + 1)
            sum(v.numel() for _, v in receiver.tensors())
        t_braid = time.perf_counter() - t0

        group.broadcast(torch.zeros(1))
        t0 = time.perf_counter()
        for t in state.values():
            group.broadcast(t)
        t_each = time.perf_counter() - t0
        if r:
            times["floor"].append(t_floor)
            times["braid"].append(t_braid)
            times["per-tensor"].append(t_each)
    if role == 1:
        q.put({k: statistics.median(v) for k, v in times.items()}
              | {"bytes": total * 4, "tensors": len(state), "buckets": len(manifest.buckets),
                 "buffer_bytes": receiver.buffers.nbytes})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(SHAPES), default="gpt2-small")
    ap.add_argument("--bucket-mb", type=float, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    ctx = mp.get_context("spawn")
    q, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=run, args=(r, port, a.model, a.bucket_mb, a.repeats, q))
             for r in (0, 1)]
    for p in procs:
        p.start()
    res = q.get(timeout=600)
    for p in procs:
        p.join()
    floor = res["floor"]
    print(f"weight sync, {a.model}: {res['tensors']} tensors, {res['bytes'] / 2**20:.0f} MiB, "
          f"{res['buckets']} buckets of <= {a.bucket_mb:g} MiB, gloo, median of {a.repeats}")
    for k in ("floor", "braid", "per-tensor"):
        print(f"  {k:<11} {res[k]:8.3f} s   {res[k] / floor:5.2f}x floor")
    print(f"  sync buffers held per side: {res['buffer_bytes'] / 2**20:.1f} MiB "
          f"({res['buffer_bytes'] / res['bytes']:.2f}x the state)")


if __name__ == "__main__":
    main()
