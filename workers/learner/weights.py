"""The learner's weights leaving it: what is exported (every weight, the LoRA adapters alone, or
the weights with the adapters merged in), the sync manifest, bucket-by-bucket ZeRO-3 gathers
streamed to the engines, the full state dict.

An exporter lists its *entries*: a name the receiver knows, its shape and dtype, the learner
parameters it is made from and how. The publisher gathers the sources of one bucket of entries
at a time (a collective on every rank under ZeRO-3), makes the entries on rank 0 and hands them
to the sender — so no rank ever holds more than a bucket of full weights beyond its shard.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass


def gathered(params: list, zero3: bool):
    """ZeRO-3's gather of full parameters for the block (every rank must enter it)."""
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def full_shape(p) -> tuple:
    return tuple(getattr(p, "ds_shape", p.shape))


@dataclass(frozen=True)
class Entry:
    name: str                        # as the receiver (vLLM, transformers, peft) names it
    shape: tuple
    dtype: object
    sources: tuple[str, ...]         # learner parameter names it is made from
    make: Callable | None = None     # tensors of ``sources`` -> the entry (None: the first)

    def value(self, named: dict):
        if self.make is None:
            return named[self.sources[0]]
        return self.make(*(named[s] for s in self.sources))


class FullWeights:
    """Every parameter under its own name (full fine-tuning)."""

    kind = "full"

    def __init__(self, named: dict):
        self.entries = [Entry(n, full_shape(p), p.dtype, (n,)) for n, p in named.items()]

    def engine_info(self) -> dict:
        return {"kind": self.kind}


class AdapterWeights:
    """The LoRA adapters alone, under peft's saved names (what vLLM loads as an adapter)."""

    kind = "adapter"

    def __init__(self, named: dict, adapters):
        self.adapters = adapters
        self.entries = [Entry(adapters.saved_name(n), full_shape(p), p.dtype, (n,))
                        for n, p in named.items() if adapters.is_adapter(n)]

    def engine_info(self) -> dict:
        return {"kind": self.kind, "peft_config": self.adapters.config_dict()}


class MergedWeights:
    """The model's own weights with the adapters merged in: W + scale * B @ A, computed in
    fp32 and cast to the weight's dtype, module by module (a module's base weight and its two
    adapter matrices are gathered together, nothing more)."""

    kind = "full"

    def __init__(self, named: dict, adapters):
        self.adapters = adapters
        self.entries = []
        for n, p in named.items():
            target = adapters.merged_name(n)
            if target is None:
                continue  # an adapter matrix, or the frozen copy of a module trained in full
            lora = adapters.lora_of(n)
            if lora is None:
                self.entries.append(Entry(target, full_shape(p), p.dtype, (n,)))
            else:
                a, b, scale = lora
                self.entries.append(Entry(target, full_shape(p), p.dtype, (n, a, b),
                                          _merge(scale)))

    def engine_info(self) -> dict:
        return {"kind": self.kind}


def _merge(scale: float):
    from workers.learner.adapters import merge

    return lambda w, a, b: merge(w, a, b, scale)


class WeightPublisher:
    """Sends an exporter's entries to the engines over the sync group (rank 0 sends; every
    rank gathers), and gathers them whole on rank 0 for a state dict or a saved folder."""

    def __init__(self, exporter, named: dict, rank: int, zero3: bool, timeout_s: float):
        self.exporter, self.named, self.rank = exporter, named, rank
        self.zero3, self.timeout_s = zero3, timeout_s
        self.by_name = {e.name: e for e in exporter.entries}
        self.manifest = None
        self.sender = None

    def manifest_dict(self, bucket_bytes: int) -> dict:
        from core.weight_sync import plan_buckets

        plan = plan_buckets([(e.name, e.shape, e.dtype) for e in self.exporter.entries],
                            bucket_bytes)
        return plan.to_dict() | {"engine": self.exporter.engine_info()}

    def init_sync(self, host: str, port: int, world_size: int, manifest: dict,
                  backend: str) -> None:
        from core.weight_sync import Manifest, SyncGroup, WeightSender

        self.manifest = Manifest.from_dict(manifest)
        if self.rank == 0:
            group = SyncGroup(host, port, world_size, 0, backend, self.timeout_s)
            self.sender = WeightSender(self.manifest, group)

    @contextlib.contextmanager
    def made(self, entries: list[Entry]):
        """{name: tensor} of the entries, full, on rank 0 (None elsewhere), while the block
        runs: their sources are gathered together."""
        sources = list(dict.fromkeys(s for e in entries for s in e.sources))
        with gathered([self.named[s] for s in sources], self.zero3):
            yield ({e.name: e.value(self.named) for e in entries} if self.rank == 0 else None)

    def push(self, version: int) -> dict:
        """Gather ZeRO-3 shards bucket by bucket (a collective on every learner rank); rank 0
        copies each bucket into one of its two buffers and broadcasts it to the engines while
        the next bucket is gathered."""
        import time

        t0 = time.perf_counter()
        failed = None
        if self.rank == 0 and self.sender is None:  # a failed sync dropped it
            failed = RuntimeError("no weight-sync group (form it again with init_weight_sync)")
        try:
            if self.sender is not None:
                self.sender.begin(version)
        except Exception as err:
            failed = err
        for i, bucket in enumerate(self.manifest.buckets):
            # Every rank gathers every bucket even after a failed send (an engine died):
            # the gathers are collectives, and a rank that skipped them would hang the others.
            with self.made([self.by_name[t.name] for t in bucket.tensors]) as tensors:
                if self.sender is not None and failed is None:
                    try:
                        self.sender.send_bucket(i, tensors)
                    except Exception as err:
                        failed = err
        if self.sender is not None and failed is None:
            try:
                self.sender.finish()
            except Exception as err:
                failed = err
        if failed is not None:
            if self.sender is not None:  # engines still in the broadcast fail now, not at
                self.sender.close()      # the timeout; the controller forms a new group
            self.sender = None
            raise RuntimeError(f"weight sync to the engines failed: {failed}") from failed
        return {"sync/seconds": time.perf_counter() - t0, "sync/bytes": self.manifest.nbytes}

    def state_dict(self) -> dict | None:
        """Every entry, full, on rank 0 (None elsewhere), gathered one entry at a time."""
        out = {}
        for e in self.exporter.entries:
            with self.made([e]) as tensors:
                if tensors is not None:
                    out[e.name] = tensors[e.name].detach().clone()
        return out if self.rank == 0 else None
