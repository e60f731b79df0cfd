"""Reward worker: runs verifier callables on rollouts, in its own actor.

Each verifier is a plain callable ``(prompts, completions, **fields) -> list[float | None]``
named by import path. It runs in a child process so a verifier that hangs past ``timeout_s`` can
be killed; one that raises, hangs or returns garbage for the batch is retried sample by sample,
and the samples that still fail score ``None``, are counted per verifier and logged with their
sample ids. The run never crashes on a verifier.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.errors import RecipeError, VerifierCallError, user_frame
from core.registry import resolve
from rewards import check_rewards
from workers.base import RewardWorker
from workers.types import Rollouts, Scores

log = logging.getLogger("braid.reward")


class VerifierSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fn: str = Field(description="import path of the verifier callable, `module:name`; with "
                    "`args`, of a factory (a class) called once with them to make the verifier")
    args: dict[str, Any] | None = None
    weight: float = 1.0
    name: str | None = Field(None, description="metric name (default: the function's name)")


_BUILT: dict[str, Any] = {}  # in the verifier process: factory verifiers, built once


def _child_init(parent: int, gb: float | None) -> None:
    """In the verifier process: end with the reward actor's process, and cap its memory."""
    _die_with_parent(parent)
    _limit_memory(gb)


def _die_with_parent(parent: int) -> None:
    """End this process when ``parent`` ends, even by SIGKILL (Linux's PR_SET_PDEATHSIG). A
    forked verifier process holds the reward actor's connections to Ray: while it lives, Ray
    does not see the actor die (seen: an actor SIGKILLed by the chaos benchmark left its
    verifier process behind, and the run waited on the dead actor's score call for 5
    minutes, until the orphan was killed)."""
    import ctypes
    import os
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the actor's shutdown ends the pool
        return
    if os.getppid() != parent:  # the parent died before the call above
        os._exit(1)


def _limit_memory(gb: float | None) -> None:
    """In the verifier process: its data memory (heap and private writable mappings: what
    Linux counts in RLIMIT_DATA; not address space merely reserved, as a JVM or Go runtime a
    verifier runs reserves it) capped at what it has now plus ``gb``, so an allocation past
    that raises MemoryError in the verifier instead of growing the node."""
    if gb is None:
        return
    import resource

    with open("/proc/self/status") as f:
        have = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    want = have + int(gb * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA,
                       (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))


def _call_verifier(spec: dict, prompts, completions, fields):
    import json

    if spec.get("args") is None:
        fn = resolve(spec["fn"], "verifier")
    else:
        key = json.dumps(spec, sort_keys=True, default=str)
        if key not in _BUILT:
            _BUILT[key] = resolve(spec["fn"], "verifier")(**spec["args"])
        fn = _BUILT[key]
    return fn(prompts, completions, **fields)


def responses(rollouts: Rollouts, recipe) -> list[str]:
    """The responses rewards judge: each completion after ``prompt.response_prefix`` (the
    engine generated after the prefix, which sits in the prompt, so the completion's text
    lacks it — a verifier checking ``<think>...</think>`` needs it back)."""
    prefix = recipe.prompt.response_prefix if recipe is not None else ""
    return [prefix + t for t in rollouts.texts] if prefix else list(rollouts.texts)


def shard_with_ids(rollout_parts, records: list[dict],
                   shard: tuple[int, int]) -> tuple[Rollouts, list[str]]:
    """This replica's slice of the step's rollouts (fetched once) and its samples' ids,
    ``<record id>#<k>`` for the k-th sample of a prompt: how failures are logged."""
    full = Rollouts.gather(rollout_parts)
    r, offset = full.shard(*shard)
    ids, seen = [], {}
    for i in full.prompt_index:
        rid = records[i]["id"]
        seen[rid] = seen.get(rid, -1) + 1
        ids.append(f"{rid}#{seen[rid]}")
    return r, ids[offset:offset + len(r)]


def environment_rewards(r: Rollouts, ids: list[str], scores: Scores) -> None:
    """The rewards the environment gave each trajectory (verifier ``env``; its named components
    as ``env/<name>``). A trajectory the environment failed (status env_error) is unscored:
    counted, and out of its group's baseline — never scored 0."""
    scores.per_verifier["env"] = list(r.env_rewards)
    comps = sorted({k for info in r.env_info for k in info.get("reward_components", {})})
    for k in comps:
        scores.per_verifier[f"env/{k}"] = [info.get("reward_components", {}).get(k)
                                           for info in r.env_info]
    failed = [i for i, v in enumerate(r.env_rewards) if v is None]
    if failed:
        scores.failures["env"] = len(failed)
        scores.failed_ids.extend(ids[i] for i in failed)
        scores.errors["env"] = f"{r.env_info[failed[0]].get('error', 'environment error')} " \
                               f"(sample {ids[failed[0]]})"
    for i, v in enumerate(r.env_rewards):
        scores.rewards[i] = None if v is None else scores.rewards[i] + v


class RuleRewardWorker(RewardWorker):
    class Args(BaseModel):
        model_config = ConfigDict(extra="forbid")
        verifiers: list[VerifierSpec | str] = Field(
            default_factory=list, description="at least one, unless the recipe's environment "
            "scores the samples (its rewards come first, as the verifier ``env``)")
        timeout_s: float = Field(10.0, gt=0, description="per verifier call")
        verifier_memory_gb: float | None = Field(
            4.0, gt=0, description="memory the verifier process may take on top of what it "
            "starts with (heap and private mappings: RLIMIT_DATA, not reserved address "
            "space); a call past it fails (its samples score None, counted). Ray's memory "
            "monitor sees a reward actor's memory but not its verifier process's: a verifier "
            "growing unbounded makes the monitor kill other actors. null: no limit")

    @classmethod
    def check_args(cls, args: dict, where: str):
        import inspect

        parsed = super().check_args(args, where)
        for i, v in enumerate(parsed.verifiers):
            fn = resolve(v if isinstance(v, str) else v.fn, f"{where}.verifiers.{i}")
            if not callable(fn):
                raise RecipeError(f"{where}.verifiers.{i}: {fn!r} is not callable")
            if not isinstance(v, str) and v.args is not None:
                try:
                    inspect.signature(fn).bind(**v.args)
                except TypeError as err:
                    raise RecipeError(f"{where}.verifiers.{i}.args: {err}") from None
        return parsed

    def setup(self, **_) -> None:
        self.specs = [VerifierSpec(fn=v) if isinstance(v, str) else v for v in self.args.verifiers]
        self.names = [s.name or s.fn.rpartition(":")[2] for s in self.specs]
        self._pool = None

    def _pool_get(self):
        if self._pool is None:
            import os

            self._pool = mp.get_context("fork").Pool(
                1, initializer=_child_init,
                initargs=(os.getpid(), self.args.verifier_memory_gb))
        return self._pool

    def _kill_pool(self):
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def _run(self, spec: VerifierSpec, prompts, completions, fields) -> tuple[list | None, str]:
        """One guarded call: (rewards, "") or (None, why) if it raised, timed out or returned
        something malformed."""
        res = self._pool_get().apply_async(
            _call_verifier, (spec.model_dump(), prompts, completions, fields))
        try:
            out = res.get(timeout=self.args.timeout_s)
        except mp.TimeoutError:
            self._kill_pool()
            return None, f"timed out after {self.args.timeout_s:g}s"
        except VerifierCallError as err:  # the set-up's, not a sample's: the run stops on it
            raise VerifierCallError(f"verifier {spec.fn}: {err}") from None
        except Exception as err:
            return None, f"{type(err).__name__}: {err}{user_frame(err)}"
        return check_rewards(out, len(completions))

    def score(self, rollout_parts, records: list[dict], shard: tuple[int, int] = (0, 1)) -> Scores:
        """Scores of the ``shard[0]``-th of ``shard[1]`` slices of the rollouts."""
        r, ids = shard_with_ids(rollout_parts, records, shard)
        texts = responses(r, self.recipe)
        recs = [records[i] for i in r.prompt_index]
        prompts = [rec["prompt"] for rec in recs]
        keys = sorted({k for rec in recs for k in rec} - {"prompt", "id", "demonstration"})
        fields = {k: [rec.get(k) for rec in recs] for k in keys}
        scores = Scores(rewards=[0.0] * len(r))
        if r.multi_turn:
            environment_rewards(r, ids, scores)
        for spec, name in zip(self.specs, self.names):
            out, why = self._run(spec, prompts, texts, fields)
            first = ""  # the first failure, for the console and the run log
            if out is None:  # isolate the failing samples
                out = []
                for i in range(len(r)):
                    one, why_one = self._run(spec, [prompts[i]], [texts[i]],
                                             {k: [v[i]] for k, v in fields.items()})
                    out.append(None if one is None else one[0])
                    if one is None and not first:
                        first = f"{why_one} (sample {ids[i]})"
                first = first or f"{why} (on the whole batch)"
            failed = [ids[i] for i, v in enumerate(out) if v is None]
            if failed:
                first = first or f"returned None (sample {failed[0]})"
                scores.failures[name] = len(failed)
                scores.failed_ids.extend(failed)
                scores.errors[name] = first
                log.warning("verifier %s could not score %d sample(s): %s; first: %s", name,
                            len(failed), ", ".join(failed[:20]), first)
            scores.per_verifier[name] = out
            for i, v in enumerate(out):
                cur = scores.rewards[i]
                scores.rewards[i] = None if (v is None or cur is None) else cur + spec.weight * v
        return scores

    def shutdown(self) -> None:
        self._kill_pool()
