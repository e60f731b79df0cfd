"""Learner rank: DeepSpeed ZeRO-3 data parallel over its own torch.distributed world.

NCCL on GPUs, gloo with ``DS_ACCELERATOR=cpu`` here — the same class. Each rank receives the
whole step batch (Ray object-store refs, zero-copy on a node), takes every world_size-th row and
splits them into micro-batches. The loss of every micro-batch is normalised by the *global*
token (or sequence) count and scaled by world_size, because ZeRO averages gradients across
ranks; so any micro-batch size and any world size give the same update as one large batch
(tests/workers/test_learner.py checks it). All ranks run the same number of forward passes —
ZeRO-3 gathers parameters collectively inside each one — padding with zero-weight rows.
"""

from __future__ import annotations

import math
import os

from pydantic import BaseModel, ConfigDict, Field

from workers.base import LearnerWorker
from workers.types import resolve_refs


class DeepSpeedLearner(LearnerWorker):
    class Args(BaseModel):
        model_config = ConfigDict(extra="forbid")
        zero_stage: int = Field(3, ge=0, le=3)
        backend: str = Field("auto", description="auto: nccl with CUDA, else gloo")
        threads: int | None = Field(None, description="torch threads (default: role num_cpus)")

    # --- lifecycle -------------------------------------------------------------------------
    def master_address(self) -> tuple[str, int]:
        from orchestrator.weight_sync import free_port, node_ip

        return node_ip(), free_port()

    def setup(self, master_addr: str = "127.0.0.1", master_port: int = 29500, **_) -> None:
        import torch

        cuda = torch.cuda.is_available()
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
                          RANK=str(self.ctx.rank), WORLD_SIZE=str(self.ctx.world_size),
                          LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        self.set_threads(self.args.threads)
        # Import order matters: zero.Init patches tensor constructors, and building a model
        # inside it fails with "Signature mismatch ... new_tensor" unless these come first.
        import deepspeed
        import torch._dynamo  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.integrations import HfDeepSpeedConfig

        backend = self.args.backend if self.args.backend != "auto" else ("nccl" if cuda else "gloo")
        deepspeed.init_distributed(dist_backend=backend)
        torch.manual_seed(self.recipe.seed)
        algo, model_cfg = self.recipe.algorithm, self.recipe.model
        self.ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            # braid owns accumulation: any number of backward() calls, then one step()
            "managed_gradient_accumulation": False,
            "gradient_clipping": algo.grad_clip,
            "zero_optimization": {"stage": self.args.zero_stage},
            "bf16": {"enabled": model_cfg.dtype == "bfloat16"},
            "fp16": {"enabled": model_cfg.dtype == "float16"},
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        # Kept alive so from_pretrained builds the model partitioned (zero.Init).
        self._hf_ds = HfDeepSpeedConfig(self.ds_config) if self.args.zero_stage == 3 else None
        dtype = getattr(torch, model_cfg.dtype)
        model = AutoModelForCausalLM.from_pretrained(model_cfg.path, dtype=dtype)
        model.config.use_cache = False
        optimizer = torch.optim.AdamW(model.parameters(), lr=algo.lr,
                                      weight_decay=algo.weight_decay)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config)
        # Drop it once the model is partitioned: while it lives, every from_pretrained in this
        # process (e.g. save_hf on rank 0 alone) would build under zero.Init and wait forever
        # for the other ranks.
        self._hf_ds = None
        tok = AutoTokenizer.from_pretrained(model_cfg.path)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.named = dict(self.engine.module.named_parameters())
        self.sender = None
        self.steps = 0

    # --- training --------------------------------------------------------------------------
    def update_rl(self, rollout_parts, advantages: list[float], ref_parts=None) -> dict:
        """One GRPO/PPO-clip step on this step's rollouts."""
        from workers.types import Rollouts

        r = Rollouts.gather(rollout_parts)
        ref = None
        if ref_parts is not None:
            ref = [lp for part in resolve_refs(ref_parts) for lp in part]
        algo = self.recipe.algorithm
        return self._step(r.prompt_ids, r.completion_ids, kind="rl", lr=algo.lr,
                          advantages=advantages, old=r.logprobs, ref=ref,
                          temperature=self.recipe.sampling.temperature or 1.0)

    def update_sft(self, prompts: list[list[int]], completions: list[list[int]]) -> dict:
        """One SFT step: token NLL of the demonstration tokens."""
        algo = self.recipe.algorithm
        return self._step(prompts, completions, kind="sft", lr=algo.sft_lr or algo.lr)

    def _step(self, prompts, completions, kind: str, lr: float, advantages=None, old=None,
              ref=None, temperature: float = 1.0) -> dict:
        import torch
        import torch.distributed as dist

        from workers.learner import losses

        algo = self.recipe.algorithm
        world, rank = self.ctx.world_size, self.ctx.rank
        n = len(prompts)
        if n == 0:
            raise ValueError(f"learner {kind} update got an empty batch")
        total_tokens = float(sum(len(c) for c in completions))
        mine = list(range(rank, n, world))
        mb = algo.micro_batch_size
        n_micro = max(1, math.ceil(math.ceil(n / world) / mb))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.engine.train()
        device = self.engine.device
        sums = torch.zeros(6, device=device)  # loss, tokens, clipfrac, kl, entropy, |logp-old|
        need_entropy = kind == "rl" and algo.entropy != 0
        for m in range(n_micro):
            rows = mine[m * mb:(m + 1) * mb]

            def pick(xs, rows=rows):
                return [xs[i] for i in rows] if xs is not None else None
            batch = losses.pack(pick(prompts), pick(completions), self.pad_id,
                                advantages=pick(advantages), old_logprobs=pick(old),
                                ref_logprobs=pick(ref)).to(device)
            out = self.engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            logp, ent = losses.token_logprobs(out.logits, batch.input_ids, temperature,
                                              with_entropy=need_entropy)
            mask = batch.loss_mask
            if kind == "rl":
                if old is None or not any(old):
                    batch.old_logprobs = logp.detach() * mask
                per_token, diag = losses.grpo_loss(
                    logp, batch, algo.clip, algo.clip_high if algo.clip_high is not None
                    else algo.clip, algo.kl, ent, algo.entropy)
                sums[2] += float((diag["clipfrac"] * mask).sum())
                if "kl" in diag:
                    sums[3] += float((diag["kl"] * mask).sum())
                sums[5] += float(((logp.detach() - batch.old_logprobs).abs() * mask).sum())
            else:
                per_token = losses.sft_loss(logp)
            loss = losses.aggregate(per_token, mask, algo.loss_agg if kind == "rl" else
                                    "token_mean", total_tokens, float(n)) * world
            self.engine.backward(loss, scale_wrt_gas=False)
            sums[0] += float(loss.detach()) / world
            sums[1] += float(mask.sum())
            if ent is not None:
                sums[4] += float((ent.detach() * mask).sum())
        self.engine.step()
        self.steps += 1
        dist.all_reduce(sums)
        tokens = max(float(sums[1]), 1.0)
        metrics = {f"{kind}/loss": float(sums[0]), f"{kind}/tokens": float(sums[1]),
                   f"{kind}/grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                   f"{kind}/lr": lr}
        if kind == "rl":
            metrics.update({"rl/clipfrac": float(sums[2]) / tokens,
                            "rl/kl": float(sums[3]) / tokens,
                            "rl/logprob_diff": float(sums[5]) / tokens})
            if need_entropy:
                metrics["rl/entropy"] = float(sums[4]) / tokens
        return metrics

    # --- weights ---------------------------------------------------------------------------
    def _full_shape(self, p):
        return tuple(getattr(p, "ds_shape", p.shape))

    def weight_manifest(self, bucket_bytes: int) -> dict:
        from orchestrator.weight_sync import plan_buckets

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
        from orchestrator.weight_sync import Manifest, SyncGroup, WeightSender

        self.manifest = Manifest.from_dict(manifest)
        if self.ctx.rank == 0:
            self.sender = WeightSender(self.manifest, SyncGroup(host, port, world_size, 0, backend))

    def push_weights(self, version: int) -> dict:
        """Gather ZeRO-3 shards bucket by bucket (a collective on every learner rank); rank 0
        copies each bucket into its persistent buffer and broadcasts it to the engines."""
        import time

        from orchestrator.weight_sync import copy_into

        t0 = time.perf_counter()
        if self.sender is not None:
            self.sender.begin(version)
        for i, bucket in enumerate(self.manifest.buckets):
            params = [self.named[t.name] for t in bucket.tensors]
            with self._gathered(params):
                if self.sender is not None:
                    copy_into(bucket, self.sender.buffers[i], self.named)
                    self.sender.send_bucket(i)
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

        model = AutoModelForCausalLM.from_config(self.engine.module.config)
        result = model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        if result.unexpected_keys or set(result.missing_keys) - tied:
            raise RuntimeError(f"save_hf: state does not match the model: missing "
                               f"{result.missing_keys}, unexpected {result.unexpected_keys}")
        model.save_pretrained(path)
        AutoTokenizer.from_pretrained(self.recipe.model.path).save_pretrained(path)
        return path
