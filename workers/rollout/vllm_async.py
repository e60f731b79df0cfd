"""Rollout worker on vLLM's asynchronous engine (``AsyncLLM``): continuous batching across calls.

``VLLMRollout`` runs one ``LLM.generate`` at a time: a call's batch starts together and the
engine idles between calls. This worker is an async Ray actor: every ``generate`` call puts its
requests into one engine as soon as it arrives, so the generations of several steps (the
pipeline's steps ahead, ``rollout.max_staleness``) and eval share its batch, and a finished
sample's slot goes to the next waiting request, whichever call it came from (a call returns when
all its samples are done). Same arguments, weight sync and outputs as ``VLLMRollout``, on CPU
and GPUs; vLLM's engine core always runs in its own process here.

A weight update pauses the engine (``update_mode``):

- ``wait`` (default): requests already running finish under the old weights; those arriving
  meanwhile wait, and run under the new ones (as does a request vLLM had preempted for cache
  room, which then spans the update).
- ``keep`` — partial rollouts: running requests are frozen where they are, the weights are
  updated, and they continue under the new ones; their caches are dropped, so the tokens so far
  are re-read by the new weights. A sample then records the first and last version it was
  generated under (``Rollouts.versions``), and each token's behaviour log-prob is the one of the
  version that sampled it — what the learner's importance ratio needs. The sync never waits for
  a long generation to finish.

vLLM labels every sampled token with the engine's weight version (set after each update), so a
sample's versions are exact whatever the timing. A failed update leaves the engine paused —
nothing is sampled from half-loaded weights — until an update succeeds (the controller replaces
the engine or ends the run). If the engine core process dies, the actor exits at its next call
(generate, a weight update, or the controller's health check), so the controller sees a dead
actor and replaces it. Which version a step's samples come from does
depend on timing here (the order a sync and a step's requests reach the engine): runs at
``max_staleness`` > 0 are not reproducible token for token with this engine (they are with
``VLLMRollout``); a checkpoint still holds the steps in flight, so a resume loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sys
from typing import Literal

from pydantic import Field, field_validator

from workers.rollout.vllm import VLLMRollout
from workers.types import Rollouts, summary


class AsyncVLLMRollout(VLLMRollout):
    max_concurrency = 64  # generate calls in flight together, and the weight syncs between

    class Args(VLLMRollout.Args):
        update_mode: Literal["wait", "keep"] = Field(
            "wait", description="a weight update lets running requests finish under the old "
            "weights (wait), or freezes them and continues them under the new ones (keep: "
            "partial rollouts, samples may span versions)")

        @field_validator("engine_in_process")
        @classmethod
        def _engine_process(cls, v):
            if v:
                raise ValueError("vLLM's asynchronous engine runs its engine core in a "
                                 "process of its own; engine_in_process must be unset")
            return v

    async def setup(self, **_) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.llm = AsyncLLM.from_engine_args(
            AsyncEngineArgs(**self.engine_kwargs(in_process=False), disable_log_stats=True))
        self.version = 0
        await self.llm.update_weight_version("0")
        self._ids = itertools.count()
        self.agent = self.agent_loop()

    async def generate(self, items: list[dict], n: int, sampling: dict,
                       index_offset: int = 0) -> tuple[dict, Rollouts]:
        """As ``VLLMRollout.generate``; the requests join whatever the engine is running."""
        from vllm.sampling_params import RequestOutputKind

        self._check_engine()
        if self.agent is not None and items and "record" in items[0]:
            return await self.trajectories(items, n, sampling, index_offset)
        prompts, params, want = self.requests(items, n, sampling)
        call = next(self._ids)
        ids = [f"{call}-{i}" for i in range(len(prompts))]

        version = self.version  # with adapters, the one every sample of this call is from
        lora = self.lora_request(version)

        async def one(rid: str, prompt, p):
            p.output_kind = RequestOutputKind.FINAL_ONLY
            out = None
            async for out in self.llm.generate(prompt, p, request_id=rid,  # noqa: B007
                                               lora_request=lora):
                pass
            return out

        llm = self.llm
        try:
            outs = await asyncio.gather(*map(one, ids, prompts, params))
        except Exception:
            self._check_engine()
            with contextlib.suppress(Exception):  # the call failed: its other requests stop
                await llm.abort(ids)
            raise
        return self.rollouts(outs, want, index_offset, version if self.adapters else None)

    async def trajectories(self, items: list[dict], n: int, sampling: dict,
                           index_offset: int) -> tuple[dict, Rollouts]:
        """As ``VLLMRollout.trajectories``; every turn a request of its own, joining whatever
        the engine runs (many trajectories in flight, their tools running meanwhile)."""
        from workers.agent.loop import AsyncSampler

        want = self.wants_logprobs(sampling)
        r = await self.agent.run(items, n, sampling,
                                 AsyncSampler(self.llm, want, lambda: self.version,
                                              self.adapter if self.adapters else None), want,
                                 index_offset, self.version, self.seeded)
        self._check_engine()
        return summary(r), r

    async def init_weight_sync(self, host: str, port: int, world_size: int, rank_offset: int,
                               manifest: dict, backend: str) -> None:
        await self.llm.collective_rpc(
            "braid_init_sync", args=(host, port, world_size, rank_offset, manifest, backend,
                                     self.recipe.weight_sync.timeout_s))

    async def receive_weights(self, version: int) -> int:
        # The pause drops cached prefixes (computed by the old weights) and, under keep, the
        # caches of the frozen requests, which are re-read under the new weights on resume. An
        # update that fails leaves the engine paused: its weights may be half loaded.
        try:
            await self.llm.pause_generation(mode=self.args.update_mode, clear_cache=True)
            got = await self.llm.collective_rpc("braid_receive_weights", args=(version,))
        except Exception:
            self._check_engine()
            raise
        if any(v != version for v in got):
            raise RuntimeError(f"rollout {self.ctx.rank}: engine workers report versions "
                               f"{got}, expected {version}")
        await self.llm.update_weight_version(str(version))
        self.version = version
        await self.llm.resume_generation()
        return version

    def health(self) -> dict:
        self._check_engine()
        return super().health()

    def _check_engine(self) -> None:
        """An actor whose engine core process died cannot generate again: it exits, so every
        call in flight and the controller's health check see a dead actor, which the
        controller replaces (an engine error would otherwise look like a failed call)."""
        if getattr(self, "llm", None) is not None and self.llm.errored:
            print(f"rollout {self.ctx.rank}: vLLM's engine core process died; exiting",
                  file=sys.stderr, flush=True)
            # vLLM's engine processes do not follow their parent: end any still running (on a
            # GPU they would hold its memory from the replacement)
            import psutil

            for child in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    child.kill()
            os._exit(1)

    async def shutdown(self) -> None:
        if getattr(self, "llm", None) is not None:
            self.llm.shutdown()
            self.llm = None
