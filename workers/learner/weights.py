"""The learner's weights leaving it: the sync manifest, bucket-by-bucket ZeRO-3 gathers
streamed to the engines, the full state dict and a Hugging Face folder."""

from __future__ import annotations


class LearnerWeights:
    """Mixed into ``DeepSpeedLearner``: needs ``self.named`` (name -> parameter),
    ``self.args.zero_stage``, ``self.ctx``, ``self.recipe`` and ``self.lm``."""

    def _full_shape(self, p):
        return tuple(getattr(p, "ds_shape", p.shape))

    def weight_manifest(self, bucket_bytes: int) -> dict:
        from core.weight_sync import plan_buckets

        return plan_buckets([(n, self._full_shape(p), p.dtype) for n, p in self.named.items()],
                            bucket_bytes).to_dict()

    def _gathered(self, params):
        import contextlib

        import deepspeed

        if self.args.zero_stage == 3:
            return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        return contextlib.nullcontext()

    def init_weight_sync(self, host: str, port: int, world_size: int, manifest: dict,
                         backend: str) -> None:
        from core.weight_sync import Manifest, SyncGroup, WeightSender

        self.manifest = Manifest.from_dict(manifest)
        if self.ctx.rank == 0:
            group = SyncGroup(host, port, world_size, 0, backend,
                              self.recipe.weight_sync.timeout_s)
            self.sender = WeightSender(self.manifest, group)

    def push_weights(self, version: int) -> dict:
        """Gather ZeRO-3 shards bucket by bucket (a collective on every learner rank); rank 0
        copies each bucket into one of its two buffers and broadcasts it to the engines while
        the next bucket is gathered."""
        import time

        t0 = time.perf_counter()
        failed = None
        if self.ctx.rank == 0 and self.sender is None:  # a failed sync dropped it
            failed = RuntimeError("no weight-sync group (form it again with init_weight_sync)")
        try:
            if self.sender is not None:
                self.sender.begin(version)
        except Exception as err:
            failed = err
        for i, bucket in enumerate(self.manifest.buckets):
            params = [self.named[t.name] for t in bucket.tensors]
            # Every rank gathers every bucket even after a failed send (an engine died):
            # the gathers are collectives, and a rank that skipped them would hang the others.
            with self._gathered(params):
                if self.sender is not None and failed is None:
                    try:
                        self.sender.send_bucket(i, self.named)
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

    def full_state_dict(self) -> dict | None:
        """Full (gathered) weights on rank 0, None elsewhere; every rank must call it."""
        out = {}
        for name, p in self.named.items():
            with self._gathered([p]):
                if self.ctx.rank == 0:
                    out[name] = p.detach().clone()
        return out if self.ctx.rank == 0 else None

    def save_hf(self, path: str) -> str | None:
        """Write a Hugging Face folder of the current policy (rank 0 writes)."""
        state = self.full_state_dict()
        if self.ctx.rank != 0:
            return None
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_config(self.lm.config)
        result = model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        if result.unexpected_keys or set(result.missing_keys) - tied:
            raise RuntimeError(f"save_hf: state does not match the model: missing "
                               f"{result.missing_keys}, unexpected {result.unexpected_keys}")
        model.save_pretrained(path)
        AutoTokenizer.from_pretrained(self.recipe.model.path).save_pretrained(path)
        return path

