"""Learner → rollout weight sync over one torch.distributed group of its own.

The group is learner rank 0 (rank 0 here) plus every rollout engine's worker process, formed on
a dedicated TCP store — never the learner's world, never vLLM's. Backend gloo on CPU, NCCL on
GPUs; the code is the same. Weights travel in buckets of one dtype and at most ``bucket_mb``.
Each side holds a *pair* of bucket-sized buffers, whatever the model's size: the sender copies
bucket i+1 into one while bucket i's broadcast from the other is in flight (a bucket of one
tensor goes out as it is), and the receiver hands each bucket's tensors to the engine's loader
as it arrives. A small header tensor (version, bucket count, numel) goes first so a receiver
that disagrees about the manifest fails loudly instead of loading garbage.

Used by `workers.learner` (send) and `workers.rollout.vllm_ext` (receive). Only torch is needed.
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    offset: int  # elements into its bucket
    numel: int


@dataclass(frozen=True)
class Bucket:
    dtype: str
    numel: int
    tensors: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class Manifest:
    """Names, shapes and dtypes of every synced tensor and the bucket each lives in."""

    buckets: tuple[Bucket, ...]

    @property
    def nbytes(self) -> int:
        return sum(b.numel * _DTYPES[b.dtype].itemsize for b in self.buckets)

    @property
    def num_tensors(self) -> int:
        return sum(len(b.tensors) for b in self.buckets)

    def to_dict(self) -> dict:
        return {"buckets": [{"dtype": b.dtype, "numel": b.numel,
                             "tensors": [[t.name, list(t.shape), t.offset, t.numel]
                                         for t in b.tensors]} for b in self.buckets]}

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        return cls(tuple(Bucket(b["dtype"], b["numel"],
                                tuple(TensorSpec(n, tuple(s), o, k) for n, s, o, k in b["tensors"]))
                         for b in d["buckets"]))


def plan_buckets(params: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
                 bucket_bytes: int) -> Manifest:
    """Greedy, order-preserving bucketing; a bucket holds one dtype and at most `bucket_bytes`
    (a single larger tensor gets a bucket of its own)."""
    buckets: list[Bucket] = []
    cur: list[TensorSpec] = []
    cur_dtype, cur_numel = None, 0

    def close():
        if cur:
            buckets.append(Bucket(str(cur_dtype), cur_numel, tuple(cur)))

    for name, shape, dtype in params:
        numel = 1
        for s in shape:
            numel *= int(s)
        full = (cur_numel + numel) * dtype.itemsize > bucket_bytes
        if cur and (dtype != cur_dtype or full):
            close()
            cur, cur_numel = [], 0
        cur_dtype = dtype
        cur.append(TensorSpec(name, tuple(int(s) for s in shape), cur_numel, numel))
        cur_numel += numel
    close()
    return Manifest(tuple(buckets))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip() -> str:
    """The address other processes reach this one on (Ray reports the interface address)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"


class SyncGroup:
    """A process group of its own: rank 0 is the sender, every other rank receives.

    Every broadcast ends within ``timeout_s`` or raises. gloo enforces the timeout itself.
    NCCL's wait on the GPU stream has none: here the CPU waits on each broadcast with the
    timeout, and on expiry (a peer died mid-sync) aborts the communicator — non-blocking, so
    the abort can interrupt a kernel stuck on a dead peer — and raises, as gloo does. NCCL's
    own watchdog is set later (twice the timeout) so that it does not tear the process down
    first.
    """

    def __init__(self, host: str, port: int, world_size: int, rank: int,
                 backend: str = "gloo", timeout_s: float = 600.0):
        timeout = datetime.timedelta(seconds=timeout_s)
        self.timeout = timeout
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.store = dist.TCPStore(host, port, world_size, is_master=(rank == 0),
                                   timeout=timeout, wait_for_workers=False)
        if backend == "gloo":
            self.pg = dist.ProcessGroupGloo(self.store, rank, world_size, timeout)
            self.device = torch.device("cpu")
        elif backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = 2 * timeout
            opts.config.blocking = 0
            self.pg = dist.ProcessGroupNCCL(self.store, rank, world_size, opts)
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            raise ValueError(f"weight_sync backend must be 'gloo' or 'nccl', got {backend!r}")

    def broadcast(self, tensor: torch.Tensor, wait: bool = True):
        """Broadcast from rank 0; with ``wait=False`` returns the pending work for ``wait``."""
        work = self.pg.broadcast(tensor, 0)
        if not wait:
            return work
        self.wait(work)
        return None

    def wait(self, work) -> None:
        if self.backend != "nccl":
            work.wait()
            return
        try:
            if not work.wait(self.timeout):  # blocks the CPU, raises or returns False on expiry
                raise TimeoutError(f"NCCL broadcast did not finish in "
                                   f"{self.timeout.total_seconds():.0f} s")
        except Exception as err:
            self.abort()
            raise RuntimeError(f"weight sync broadcast failed (communicator aborted): "
                               f"{err}") from err

    def abort(self) -> None:
        """Release the communicator after a failure (NCCL); the group is unusable after."""
        abort = getattr(self.pg, "abort", None)
        if abort is not None:
            try:
                abort()
            except Exception:  # already torn down by the watchdog
                pass

    def close(self) -> None:
        """Tear the group down after a failed sync: its connections close, so members still
        waiting in a broadcast (engines that outlived a dead one) fail at once instead of
        after the timeout. The group is unusable after."""
        import gc

        if self.backend == "nccl":
            self.abort()
        self.pg = self.store = None
        gc.collect()  # gloo closes its sockets when the last reference goes


class _BufferPair:
    """Two byte buffers used alternately, bucket i in buffer i % 2, each the size of the
    largest bucket it takes; each remembers the broadcast still reading or writing it, waited
    for before the buffer is reused."""

    def __init__(self, manifest: Manifest, group: SyncGroup, copied=lambda bucket: True):
        sizes = [b.numel * _DTYPES[b.dtype].itemsize if copied(b) else 0
                 for b in manifest.buckets]
        self.group = group
        self.bytes = [torch.empty(max(sizes[k::2], default=0), dtype=torch.uint8,
                                  device=group.device) for k in range(2)]
        self.pending: list = [None, None]

    def take(self, i: int, bucket: Bucket) -> torch.Tensor:
        """Buffer i % 2 as bucket i's flat tensor, once its previous broadcast is done."""
        k = i % 2
        self.settle(k)
        dtype = _DTYPES[bucket.dtype]
        return self.bytes[k][:bucket.numel * dtype.itemsize].view(dtype)

    def settle(self, k: int | None = None) -> None:
        for j in (k,) if k is not None else (0, 1):
            if self.pending[j] is not None:
                work, self.pending[j] = self.pending[j], None
                self.group.wait(work)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self.bytes)


def _header(version: int, manifest: Manifest, device) -> torch.Tensor:
    total = sum(b.numel for b in manifest.buckets)
    return torch.tensor([version, len(manifest.buckets), total], dtype=torch.int64, device=device)


class WeightSender:
    """Rank 0's side: ``begin(version)``, then ``send_bucket(i, tensors)`` for each bucket in
    order — the caller interleaves it with whatever gathers the weights (ZeRO-3 gathers bucket
    by bucket) — then ``finish()``."""

    def __init__(self, manifest: Manifest, group: SyncGroup):
        self.manifest, self.group = manifest, group
        # a bucket of one tensor is broadcast from the tensor itself: no buffer for it
        self.buffers = _BufferPair(manifest, group, lambda b: len(b.tensors) > 1)

    def begin(self, version: int) -> None:
        self.group.broadcast(_header(version, self.manifest, self.group.device))

    def send_bucket(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        """Broadcast bucket i from full tensors. A bucket of one tensor (one larger than the
        bucket size) goes out as it is (a contiguous copy if it is not), and is waited for: the
        caller may free the tensor after (a ZeRO-3 gather). Others are copied into a buffer of
        the pair and left in flight while the caller gathers the next bucket."""
        bucket = self.manifest.buckets[i]
        if len(bucket.tensors) == 1:
            t = tensors[bucket.tensors[0].name].detach()
            self.group.broadcast(t.to(self.group.device).contiguous().view(-1))
            return
        buf = self.buffers.take(i, bucket)
        copy_into(bucket, buf, tensors)
        self.buffers.pending[i % 2] = self.group.broadcast(buf, wait=False)

    def finish(self) -> None:
        self.buffers.settle()

    def close(self) -> None:
        """After a failed send: drop the broadcasts in flight and tear the group down."""
        self.buffers.pending = [None, None]
        self.group.close()

    def send(self, version: int, tensors: dict[str, torch.Tensor]) -> None:
        """All buckets from full tensors at hand (no gathering needed)."""
        self.begin(version)
        for i in range(len(self.manifest.buckets)):
            self.send_bucket(i, tensors)
        self.finish()


def copy_into(bucket: Bucket, buf: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
    """Copy full (gathered) tensors into their slots of a bucket buffer."""
    for t in bucket.tensors:
        buf[t.offset:t.offset + t.numel].copy_(tensors[t.name].detach().reshape(-1))


class WeightReceiver:
    """A rollout engine's side: ``begin(version)`` takes the header, then ``tensors()`` yields
    every (name, tensor) bucket by bucket as it arrives, for the engine's weight loader. The
    next bucket's broadcast is posted into the other buffer of the pair before the current
    one's tensors are handed out. The loader must take every tensor (the stream is the sync)."""

    def __init__(self, manifest: Manifest, group: SyncGroup):
        self.manifest, self.group = manifest, group
        self.buffers = _BufferPair(manifest, group)
        self.done = True

    def begin(self, expected_version: int | None = None) -> int:
        header = _header(-1, self.manifest, self.group.device)
        self.group.broadcast(header)
        version, nb, total = (int(x) for x in header.tolist())
        mine = _header(version, self.manifest, self.group.device).tolist()
        if [version, nb, total] != mine:
            raise RuntimeError(f"weight sync manifest mismatch: sender has {nb} buckets/{total} "
                               f"elements, receiver {mine[1]}/{mine[2]}")
        if expected_version is not None and version != expected_version:
            raise RuntimeError(f"weight sync: expected version {expected_version}, got {version}")
        self.done = False
        return version

    def _post(self, i: int) -> torch.Tensor:
        buf = self.buffers.take(i, self.manifest.buckets[i])
        self.buffers.pending[i % 2] = self.group.broadcast(buf, wait=False)
        return buf

    def tensors(self, copy: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of every synced tensor, in manifest order. ``copy=False`` yields views
        into the buffer, valid only until the next bucket after it arrives: for a consumer that
        copies each tensor before asking for the next (vLLM's layer-by-layer reload keeps a
        layer's tensors until the layer is complete, so it needs copies)."""
        buckets = self.manifest.buckets
        nxt = self._post(0) if buckets else None
        for i, bucket in enumerate(buckets):
            buf = nxt
            self.buffers.settle(i % 2)
            nxt = self._post(i + 1) if i + 1 < len(buckets) else None
            for t in bucket.tensors:
                view = buf[t.offset:t.offset + t.numel].view(t.shape)
                yield t.name, view.clone() if copy else view
        self.done = True

    def receive(self, expected_version: int | None = None) -> tuple[int, dict]:
        """The whole state at once (tests, tools): version and {name: tensor}."""
        version = self.begin(expected_version)
        return version, dict(self.tensors())
