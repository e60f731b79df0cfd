"""Placement and worker groups.

Each role gets one Ray placement group of ``replicas`` bundles built from its ``resources``
(fractional CPUs here, whole GPUs on a GPU cluster — so rollout and learner never share a GPU
unless a recipe asks for it). A WorkerGroup wraps the role's plain worker class with
``ray.remote`` and names its dispatch at the call site:

- ``fanout(method, ...)``: the same call on every replica (setup, weight sync, learner steps);
- ``split(method, items, ...)``: items split across replicas, contiguous (rollout);
- ``call(refs)``: gather, turning an actor failure into an error that names role and rank.
"""

from __future__ import annotations

import math
from typing import Any

from core.errors import user_frame
from workers.base import WorkerContext


class WorkerError(RuntimeError):
    """A worker call failed; the message names the role and the cause. ``died`` tells an
    actor that is gone (restartable) from a method that raised (a bug or bad input)."""

    def __init__(self, message: str, role: str = "", died: bool = False):
        super().__init__(message)
        self.role, self.died = role, died


class WorkerGroup:
    def __init__(self, role: str, cfg, recipe, cls: type, args, env: dict[str, str],
                 ready_timeout_s: float = 300.0):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.role, self.cfg, self.ready_timeout_s = role, cfg, ready_timeout_s
        res = cfg.resources
        bundle = {"CPU": res.num_cpus} | ({"GPU": res.num_gpus} if res.num_gpus else {})
        self.pg = placement_group([dict(bundle) for _ in range(cfg.replicas)],
                                  strategy=cfg.strategy, name=f"braid-{recipe.name}-{role}")
        ready, _ = ray.wait([self.pg.ready()], timeout=ready_timeout_s)
        if not ready:
            raise WorkerError(
                f"roles.{role}: the cluster cannot place {cfg.replicas} x {bundle} "
                f"({cfg.strategy}) within {ready_timeout_s:.0f}s; available: "
                f"{ray.available_resources()}")
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

    def split(self, method: str, items: list, *args, num_returns: int = 1,
              offset: int = 0) -> list:
        """Contiguous shards of `items`, one call per replica:
        ``method(shard, *args, index_offset=<index of the shard's first item, + offset>)``."""
        per = math.ceil(len(items) / len(self.actors)) if items else 0
        out = []
        for i, a in enumerate(self.actors):
            shard = items[i * per:(i + 1) * per]
            if shard:
                fn = getattr(a, method).options(num_returns=num_returns)
                out.append(fn.remote(shard, *args, index_offset=offset + i * per))
        return out

    def call(self, refs: list, what: str = "") -> list[Any]:
        import ray

        try:
            return ray.get(refs)
        except ray.exceptions.RayActorError as err:
            raise WorkerError(f"{self.role} actor died{' during ' + what if what else ''}: "
                              f"{_first_line(err)}{self._where(err)}", self.role,
                              died=True) from err
        except ray.exceptions.RayTaskError as err:
            cause = err.cause if getattr(err, "cause", None) is not None else err
            raise WorkerError(f"{self.role}{' ' + what if what else ''} failed: "
                              f"{type(cause).__name__}: {_first_line(cause)}{self._where(err)}",
                              self.role) from err

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
            except ray.exceptions.RayActorError:
                out.append(i)
            except ray.exceptions.GetTimeoutError:
                pass  # busy, not dead
        return out

    def restart(self, rank: int, **setup_kwargs) -> None:
        """A fresh actor in the dead one's placement bundle, set up like the first."""
        import ray

        ray.kill(self.actors[rank], no_restart=True)
        self.actors[rank] = self._make(rank)
        ref = self.actors[rank].setup.remote(**setup_kwargs)
        ready, _ = ray.wait([ref], timeout=self.ready_timeout_s)
        if not ready:  # e.g. its node is gone and no other has room for the bundle
            raise WorkerError(f"{self.role} rank {rank}: the replacement actor was not up "
                              f"within {self.ready_timeout_s:.0f}s; available: "
                              f"{ray.available_resources()}", self.role)
        self.call([ref], f"setup of replacement rank {rank}")

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


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__
