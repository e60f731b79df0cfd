"""Worker lifecycle and the base class of each role.

A worker is a plain Python class: a cheap ``__init__`` that only stores its context, a heavy
``setup()`` that imports engines and loads models (so its failures reach the caller of setup,
with the role and rank named), ``health()`` and ``shutdown()``. The worker group wraps the class
with ``ray.remote``; tests and GPU smoke scripts can drive the same class in a plain process.

A role's arguments are declared as a pydantic ``Args`` model on the class, so ``braid
validate`` checks them without building anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from core.errors import validate_model


class NoArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class WorkerContext:
    role: str
    rank: int
    world_size: int
    recipe: Any  # orchestrator.config.Recipe; typed loosely so workers import without it
    args: BaseModel = field(default_factory=NoArgs)


class Worker:
    Args: ClassVar[type[BaseModel]] = NoArgs
    # calls an actor runs at once: 1 runs them one by one in the order they were sent (which
    # the rollout pipeline's determinism relies on); an async worker (its methods coroutines)
    # raises it to interleave calls on its event loop
    max_concurrency: ClassVar[int] = 1

    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx
        self.args = ctx.args
        self.recipe = ctx.recipe

    @classmethod
    def check_args(cls, args: dict, where: str) -> BaseModel:
        """Validate recipe args; subclasses also resolve import paths they hold."""
        return validate_model(cls.Args, args, where)

    def setup(self, **kwargs) -> None:
        pass

    def health(self) -> dict:
        return {"role": self.ctx.role, "rank": self.ctx.rank, "pid": os.getpid()}

    def shutdown(self) -> None:
        pass

    def set_threads(self, n: int | None = None) -> None:
        """Ray sets OMP_NUM_THREADS=1 in actors, which made CPU work 25-35% slower than two
        threads here; default to the role's CPU reservation, rounded up."""
        import math

        import torch

        role = getattr(self.recipe.roles, self.ctx.role, None) if self.recipe else None
        cpus = role.resources.num_cpus if role is not None else 1
        torch.set_num_threads(n or max(1, math.ceil(cpus)))


class RolloutWorker(Worker):
    """generate(records, n, sampling) -> Rollouts; init_weight_sync(...); receive_weights(v)."""


class LearnerWorker(Worker):
    """One data-parallel rank: update(...), push_weights(v), state_dict()."""


class CriticWorker(Worker):
    """One data-parallel rank of the value model: values(rollouts), update(value terms)."""


class ReferenceWorker(Worker):
    """logprobs(rollouts) -> per-sample token log-probs under the frozen initial policy."""


class RewardWorker(Worker):
    """score(rollouts, records, shard=(k, of)) -> Scores of the k-th of ``of`` contiguous
    slices of the samples (``Rollouts.shard``): every replica gets the step's rollout refs and
    scores its slice, so replicas share the work whatever the number of rollout engines."""


ROLE_BASES: dict[str, type[Worker]] = {
    "rollout": RolloutWorker, "learner": LearnerWorker,
    "reference": ReferenceWorker, "reward": RewardWorker, "teacher": RolloutWorker,
    "critic": CriticWorker,
}
