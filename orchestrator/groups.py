"""Placement and worker groups.

Each role gets one Ray placement group of ``replicas`` bundles built from its ``resources``
(fractional CPUs here, whole GPUs on a GPU cluster — so rollout and learner never share a GPU
unless a recipe asks for it). A WorkerGroup wraps the role's plain worker class with
``ray.remote`` and names its dispatch at the call site:

- ``fanout(method, ...)``: the same call on every replica (setup, weight sync, learner steps);
- ``split(method, items, ...)``: items split across replicas, contiguous (rollout);
- ``call(refs)``: gather, turning an actor failure into an error that names role and rank,
  and an actor that does not answer within its deadline (``failures.deadline``) into a killed
  one: a hung actor is handled as a dead one (orchestrator/recovery.py).
"""

from __future__ import annotations

import math
import re
import time
from collections import deque
from typing import Any

from core.errors import user_frame
from workers.base import WorkerContext


class WorkerError(RuntimeError):
    """A worker call failed; the message names the role and the cause. ``died`` tells an
    actor that is gone (restartable) from a method that raised (a bug or bad input); ``lost``
    a call whose input objects Ray lost (their node or owner gone: the rollouts are made
    again); ``oom`` an actor Ray's memory monitor killed, with what each killed actor used
    (``memory``: Ray's actor id -> GB, as the monitor measured it)."""

    def __init__(self, message: str, role: str = "", died: bool = False, lost: bool = False):
        super().__init__(message)
        self.role, self.died, self.lost = role, died, lost
        self.killed: list[int] = []  # ranks braid killed as hung (orchestrator.groups)
        self.oom = False
        self.memory: dict[str, float] = {}


# What each way Ray reports a failure means for a run (docs/cluster.md, "Failures"): the
# actor is gone (replaced, or a learner's attempt ends), its inputs are gone (made again), or
# the call itself failed (a bug, bad input, a full disk: one line, the run stops).
DIED = ("RayActorError", "OutOfMemoryError", "WorkerCrashedError", "NodeDiedError",
        "LocalRayletDiedError", "ActorUnschedulableError", "TaskUnschedulableError",
        "ActorPlacementGroupRemoved", "TaskPlacementGroupRemoved")
# OwnerDied, ObjectReconstructionFailed, ObjectFetchTimedOut, ...; InputsLost: a group's ranks
# agreeing that one of them could not fetch its inputs (workers/learner/deepspeed.py)
LOST = ("ObjectLostError", "InputsLost")


def ray_failure(err: BaseException) -> str:
    """'died', 'lost' or 'error': what a Ray exception says of the call. A method that raised
    an error of its own is judged by it: fetching a lost object is 'lost', and so is fetching
    the result of an actor that died (its input is gone, not the actor that asked)."""
    import ray

    cause = getattr(err, "cause", None)
    if isinstance(err, ray.exceptions.RayTaskError) and cause is not None:
        names = {c.__name__ for c in type(cause).__mro__}
        if names & (set(LOST) | set(DIED)):
            return "lost"
        return "error"
    names = {c.__name__ for c in type(err).__mro__}
    if names & set(LOST):
        return "lost"
    return "died" if names & set(DIED) else "error"


_NODE = re.compile(r"was ([\d.]+\s*\w+) used / ([\d.]+\s*\w+) limit \(([\d.]+)\)")
_THRESHOLD = re.compile(r"exceeded threshold of \d+B \(([\d.]+)% of")
_KILLED = re.compile(r"Actor\((\w+)\).*?actual memory used=([\d.]+)GB")


def oom_details(err: BaseException) -> tuple[str, dict[str, float]]:
    """From an OutOfMemoryError: '(node at 94% of 23.54GB, threshold 95%)' and what each
    killed actor used (Ray's actor id -> GB)."""
    text = str(err)
    node, limit = _NODE.search(text), _THRESHOLD.search(text)
    where = ""
    if node:
        where = f"node at {float(node.group(3)):.0%} of {node.group(2)}"
        where += f", threshold {float(limit.group(1)):g}%" if limit else ""
    used = {actor: float(gb) for actor, gb in _KILLED.findall(text)}
    return (f" ({where})" if where else ""), used


class Deadlines:
    """How long a role's call may take (``failures.deadline``): a fixed time from ``calls``
    ("role.method", else "role"; 0: none), else the larger of ``floor_s`` and ``factor`` times
    the slowest of the role's last ``window`` calls of that method. A call's method is the first
    word of its description ("setup of replacement rank 1" is a "setup")."""

    def __init__(self, cfg, role: str):
        self.cfg, self.role = cfg, role
        self.recent: dict[str, deque] = {}

    def seconds(self, what: str) -> float | None:
        method = what.split()[0] if what else ""
        calls = self.cfg.calls
        fixed = calls.get(f"{self.role}.{method}", calls.get(self.role))
        if fixed is not None:
            return fixed or None
        past = self.recent.get(method)
        return max(self.cfg.floor_s, self.cfg.factor * max(past)) if past else self.cfg.floor_s

    def observe(self, what: str, seconds: float) -> None:
        method = what.split()[0] if what else ""
        self.recent.setdefault(method, deque(maxlen=self.cfg.window)).append(seconds)


def check_capacity(roles: dict, nodes: list[dict[str, float]], autoscaling: bool) -> None:
    """Refuse at once what the cluster can never place (instead of waiting for it): a replica
    bigger than every node, a STRICT_PACK role bigger than every node, a STRICT_SPREAD role with
    more replicas than nodes that hold one, or roles that need more CPUs or GPUs in all than the
    cluster has. ``roles``: role -> RoleConfig; ``nodes``: each live node's resources. With an
    autoscaler the cluster may grow: nothing is refused."""
    def fmt(res: dict) -> str:
        return ", ".join(f"{v:g} {k}" for k, v in res.items() if v or k == "CPU")

    def holds(node: dict, res: dict, times: float = 1) -> bool:
        return all(node.get(k, 0.0) + 1e-9 >= v * times for k, v in res.items())

    problems, need, parts = [], {"CPU": 0.0, "GPU": 0.0}, []
    for role, cfg in roles.items():
        one = {"CPU": cfg.resources.num_cpus, "GPU": cfg.resources.num_gpus}
        for k in need:
            need[k] += cfg.replicas * one[k]
        parts.append(f"{role} {cfg.replicas} x {fmt(one)}")
        fits = [n for n in nodes if holds(n, one)]
        if not fits:
            problems.append(f"roles.{role}: a replica needs {fmt(one)}; no node has that")
        elif cfg.strategy == "STRICT_PACK" and not any(holds(n, one, cfg.replicas) for n in nodes):
            whole = {k: v * cfg.replicas for k, v in one.items()}
            problems.append(f"roles.{role}: STRICT_PACK puts its {cfg.replicas} replicas on one "
                            f"node; no node has {fmt(whole)}")
        elif cfg.strategy == "STRICT_SPREAD" and len(fits) < cfg.replicas:
            problems.append(f"roles.{role}: STRICT_SPREAD needs {cfg.replicas} nodes that hold "
                            f"{fmt(one)}; the cluster has {len(fits)}")
    total = {k: sum(n.get(k, 0.0) for n in nodes) for k in need}
    if any(need[k] > total[k] + 1e-9 for k in need):
        problems.append(f"the roles need {fmt(need)} in all ({'; '.join(parts)})")
    if problems and not autoscaling:
        raise WorkerError(
            "the cluster can never run this recipe: " + "; ".join(problems) + f". It has "
            f"{fmt(total)} on {len(nodes)} node(s) and no autoscaler (ray.autoscaling: false): "
            "lower roles.<role>.replicas or resources, or add nodes")


class WorkerGroup:
    def __init__(self, role: str, cfg, recipe, cls: type, args, env: dict[str, str],
                 ready_timeout_s: float = 300.0):
        from ray.util.placement_group import placement_group, remove_placement_group

        self.role, self.cfg, self.ready_timeout_s = role, cfg, ready_timeout_s
        self.deadlines: Deadlines | None = None  # set once the group is set up
        self.oom_killed: dict[int, bool] = {}  # rank -> Ray's memory monitor killed it (dead())
        res = cfg.resources
        bundle = {"CPU": res.num_cpus} | ({"GPU": res.num_gpus} if res.num_gpus else {})
        self.pg = placement_group([dict(bundle) for _ in range(cfg.replicas)],
                                  strategy=cfg.strategy, name=f"braid-{recipe.name}-{role}")
        try:  # interrupted or failing, the group releases its placement (and actors in it)
            self._place_and_start(cls, cfg, recipe, args, env, bundle)
        except BaseException:
            remove_placement_group(self.pg)
            raise

    def _place_and_start(self, cls, cfg, recipe, args, env, bundle) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        role, res, ready_timeout_s = self.role, cfg.resources, self.ready_timeout_s
        ready, waited = [], 0.0
        while not ready and waited < ready_timeout_s:  # the cluster is busy, or still growing
            step = min(30.0, ready_timeout_s - waited)
            ready, _ = ray.wait([self.pg.ready()], timeout=step)
            waited += step
            if not ready and waited < ready_timeout_s:
                print(f"braid: waiting {waited:.0f}s of {ready_timeout_s:.0f}s for the cluster "
                      f"to place roles.{role}: {cfg.replicas} x {bundle} ({cfg.strategy}); "
                      f"available now: {_resources(ray.available_resources())}", flush=True)
        if not ready:
            raise WorkerError(
                f"roles.{role}: the cluster cannot place {cfg.replicas} x {bundle} "
                f"({cfg.strategy}) within {ready_timeout_s:.0f}s; available: "
                f"{_resources(ray.available_resources())}")
        remote = ray.remote(cls)

        def make(i: int):
            return remote.options(
                num_cpus=res.num_cpus, num_gpus=res.num_gpus,
                max_concurrency=cls.max_concurrency,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.pg, placement_group_bundle_index=i),
                runtime_env={"env_vars": env} if env else None,
            ).remote(WorkerContext(role, i, cfg.replicas, recipe, args))

        self._make = make
        self.actors = [make(i) for i in range(cfg.replicas)]

    def __len__(self) -> int:
        return len(self.actors)

    def fanout(self, method: str, *args, **kwargs) -> list:
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def shards(self, items: list) -> list[tuple[int, list, int]]:
        """(rank, its contiguous shard of ``items``, the index of the shard's first item) for
        each replica that gets items."""
        per = math.ceil(len(items) / len(self.actors)) if items else 0
        return [(i, items[i * per:(i + 1) * per], i * per) for i in range(len(self.actors))
                if items[i * per:(i + 1) * per]]

    def split(self, method: str, items: list, *args, num_returns: int = 1,
              offset: int = 0) -> list:
        """Contiguous shards of `items` (``shards``), one call per replica:
        ``method(shard, *args, index_offset=<index of the shard's first item, + offset>)``."""
        return [getattr(self.actors[i], method).options(num_returns=num_returns).remote(
                    shard, *args, index_offset=offset + first)
                for i, shard, first in self.shards(items)]

    def call(self, refs: list, what: str = "") -> list[Any]:
        """The results of ``refs`` (calls on this group's actors). The first error raises as
        soon as it arrives; past the deadline, the actors that still owe results are killed."""
        import ray

        deadline = self.deadlines.seconds(what) if self.deadlines else None
        start = time.monotonic()
        pending, got = list(refs), {}
        while pending:
            left = None if deadline is None else max(0.0, start + deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not ready:
                self.kill_hung(pending, what, deadline)
            # a failed call raises now, not when its peers finish (or meet their deadline)
            got.update(zip(ready, self._get(ready, what)))
        out = [got[r] for r in refs]
        if self.deadlines:
            self.deadlines.observe(what, time.monotonic() - start)
        return out

    def _get(self, refs: list, what: str) -> list[Any]:
        import ray

        try:
            return ray.get(refs)
        except ray.exceptions.RayError as err:
            raise self.error(err, what) from err

    def error(self, err: BaseException, what: str = "") -> WorkerError:
        """One WorkerError for any way Ray reports a failed call on this group: its message
        says what happened in a line (an actor killed by Ray's memory monitor, its node gone,
        its inputs lost, or the exception the method raised, at the user's frame)."""
        import ray

        kind, during = ray_failure(err), f" during {what}" if what else ""
        cause = err.cause if isinstance(err, ray.exceptions.RayTaskError) and getattr(
            err, "cause", None) is not None else err
        if isinstance(cause, ray.exceptions.OutOfMemoryError):
            where, used = oom_details(cause)
            mine = {i: used[a._actor_id.hex()] for i, a in enumerate(self.actors)
                    if a._actor_id.hex() in used}
            measured = "".join(f"; rank {i} used {gb:.2f} GB" for i, gb in mine.items())
            out = WorkerError(f"{self.role} actor killed by Ray's memory monitor{during}"
                              f"{where}{measured}", self.role, died=True)
            out.oom, out.memory = True, used
        elif kind == "died":
            how = {"NodeDiedError": "its node died", "LocalRayletDiedError": "its node died",
                   "WorkerCrashedError": "its worker process crashed",
                   "ActorUnschedulableError": "it cannot be placed",
                   "TaskUnschedulableError": "it cannot be placed",
                   "ActorPlacementGroupRemoved": "its placement group was removed",
                   "TaskPlacementGroupRemoved": "its placement group was removed",
                   }.get(type(cause).__name__, "died")
            out = WorkerError(f"{self.role} actor {how}{during}: {_first_line(cause)}"
                              f"{self._where(err)}", self.role, died=True)
        elif kind == "lost":
            out = WorkerError(f"{self.role}{' ' + what if what else ''}: Ray lost its input "
                              f"objects ({type(cause).__name__}: {_first_line(cause)})",
                              self.role, lost=True)
        else:
            out = WorkerError(f"{self.role}{' ' + what if what else ''} failed: "
                              f"{type(cause).__name__}: {_first_line(cause)}{self._where(err)}",
                              self.role)
        return out

    def kill_hung(self, pending: list, what: str, deadline: float) -> None:
        """Kill the actors of this group that owe ``pending`` results past their deadline, and
        raise the error of a dead actor (recovery replaces them, or stops on a learner); the
        error's ``killed`` names them (Ray may not report them dead at once)."""
        import ray

        # a result's task names the actor that runs it (Ray's ids of this group's actors)
        owner = {a._actor_id: i for i, a in enumerate(self.actors)}
        ranks = sorted({owner[r.task_id().actor_id()] for r in pending
                        if r.task_id().actor_id() in owner})
        for i in ranks:
            ray.kill(self.actors[i], no_restart=True)
        limit = (f"the deadline: failures.deadline.calls.{self.role}."
                 f"{what.split()[0] if what else ''}, or floor_s and factor")
        if not ranks:  # results of no actor of this group (restored, or another group's)
            raise WorkerError(f"{self.role}: {what or 'a call'} did not finish within "
                              f"{deadline:.0f}s ({limit})", self.role)
        err = WorkerError(f"{self.role} rank(s) {ranks} did not finish {what or 'a call'} within "
                          f"{deadline:.0f}s ({limit}); killed as hung", self.role, died=True)
        err.killed = ranks
        raise err

    def await_with(self, refs: list, sender: list, what: str, at_least: float = 0.0) -> None:
        """Wait for ``refs``, this group's side of a collective whose ``sender`` (another
        group's calls) broadcasts to it — a weight sync, where a receiver that never joins holds
        everyone. The sender's collective times out by itself after ``at_least`` seconds (its
        own timeout) when a receiver is stuck; so once the sender has finished, receivers that
        have not by this group's deadline (at least ``at_least`` + 10 s) are killed as hung.
        A sender still busy at the deadline is the one stuck: its own call's deadline decides."""
        import ray

        deadline = self.deadlines.seconds(what) if self.deadlines else None
        if deadline is None or not refs:
            return
        deadline = max(deadline, at_least + 10.0)
        start = time.monotonic()
        _, busy = ray.wait(sender, num_returns=len(sender), timeout=deadline)
        if busy:
            return
        left = max(0.0, start + deadline - time.monotonic())
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=left)
        if pending:
            self.kill_hung(pending, what, deadline)
        self.deadlines.observe(what, time.monotonic() - start)

    def _where(self, err: BaseException) -> str:
        """The user's frame in the remote traceback, and the class, when the class is not
        braid's own: a worker of the user's that raised is named, not braid's internals."""
        frame = user_frame(err)
        ours = self.cfg.cls.partition(":")[0].split(".")[0] in ("orchestrator", "workers",
                                                                "rewards")
        return frame + ("" if ours or not frame else f" (roles.{self.role}.cls: {self.cfg.cls})")

    def dead(self, timeout_s: float = 30.0) -> list[int]:
        """Ranks whose actor is gone (a health ping fails with an actor error)."""
        import ray

        pings = {i: a.health.remote() for i, a in enumerate(self.actors)}
        ray.wait(list(pings.values()), num_returns=len(pings), timeout=timeout_s)
        out = []
        for i, ref in pings.items():
            try:
                ray.get(ref, timeout=0)
            except ray.exceptions.GetTimeoutError:
                pass  # busy, not dead
            except ray.exceptions.RayError as err:  # killed, crashed, its node gone, ...
                if ray_failure(err) == "died":
                    out.append(i)
                    self.oom_killed[i] = isinstance(err, ray.exceptions.OutOfMemoryError)
        return out

    def restart(self, rank: int, **setup_kwargs) -> None:
        """A fresh actor in the dead one's placement bundle, set up like the first."""
        import ray

        ray.kill(self.actors[rank], no_restart=True)
        self.actors[rank] = self._make(rank)
        up = self.actors[rank].__ray_ready__.remote()  # placed and constructed
        ready, _ = ray.wait([up], timeout=self.ready_timeout_s)
        if not ready:  # e.g. its node is gone and no other has room for the bundle
            ray.kill(self.actors[rank], no_restart=True)
            raise WorkerError(f"{self.role} rank {rank}: the replacement actor was not up "
                              f"within {self.ready_timeout_s:.0f}s; available: "
                              f"{_resources(ray.available_resources())}", self.role)
        self.call([up, self.actors[rank].setup.remote(**setup_kwargs)],
                  f"setup of replacement rank {rank}")

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        try:
            ray.get([a.shutdown.remote() for a in self.actors], timeout=30)
        except Exception:
            pass
        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self.pg)


def _resources(res: dict) -> dict:
    """The CPUs and GPUs of a Ray resource dict (not its memory, node and bundle entries)."""
    return {k: round(v, 2) for k, v in res.items() if k in ("CPU", "GPU")}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__
