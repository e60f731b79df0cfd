"""Schedules: pure policies that decide, step by step, what the learner does.

A schedule never calls a worker. Each step the controller asks ``wants_rollouts(step)``; if so it
generates and scores, then calls ``decide(step, signals)`` and executes the returned ops in
order. After any op that changes weights the controller syncs the rollout engines before they
generate again (unless the schedule placed a ``Sync`` itself). Periodic ``Eval`` and
``Checkpoint`` come from the recipe's cadence; a schedule may also emit them. ``state_dict`` /
``load_state_dict`` carry buffers and counters into checkpoints. With ``rollout.max_staleness``
k > 0, ``wants_rollouts(s)`` is asked when step s's prompts are handed to the engines (k steps
early) and again at step s, and ``signals`` come from rollouts up to k weight versions old; a
schedule states what it tolerates in ``max_staleness``.

A schedule of the user's own is any class with these methods, named by import path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.errors import RecipeError, validate_model
from core.registry import resolve, user_code
from orchestrator.signals import StepSignals


# --- ops ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RLUpdate:
    """A policy-gradient step on this step's rollouts (of the prompts in ``ids``; None: all).

    ``demos_in_group`` (LUFFY): each selected prompt's demonstration joins its group as an
    off-policy sample — scored by the verifier, part of the group's advantage baseline, trained
    with the shaped term -A * p / (p + gamma).
    """

    ids: tuple[str, ...] | None = None
    coef: float = 1.0
    demos_in_group: bool = False
    gamma: float = 0.1
    optimizer: str = "main"


@dataclass(frozen=True)
class SFTUpdate:
    """An SFT step on the demonstrations of these prompt ids (None: every prompt of this step's
    batch that has one). ``token_weight="p(1-p)"`` is CHORD-phi; ``optimizer`` names the
    optimizer state (ReLIFT keeps one of its own for SFT).

    ``source="samples"`` (rejection-sampling fine-tuning): on the step's own rollouts instead —
    those with reward >= ``threshold``, at most ``per_prompt`` distinct texts per prompt.
    """

    ids: tuple[str, ...] | None = None
    coef: float = 1.0
    token_weight: str = "none"
    entropy: float = 0.0
    optimizer: str = "main"
    source: str = "demos"
    threshold: float = 1.0
    per_prompt: int = 1


@dataclass(frozen=True)
class MixedUpdate:
    """One optimizer step on the weighted sum of several terms (CHORD, HPT)."""

    terms: tuple[RLUpdate | SFTUpdate, ...]
    optimizer: str = "main"


@dataclass(frozen=True)
class Sync:
    """Push the learner's weights to every rollout engine."""


@dataclass(frozen=True)
class Eval:
    """Greedy held-out evaluation."""


@dataclass(frozen=True)
class Checkpoint:
    """Save the policy."""


@dataclass(frozen=True)
class Probe:
    """Ask the learner for a signal without changing weights; the result lands in
    ``signals.probes[name]`` before ``decide`` runs. ``sft_grad_norm``: the gradient norm of
    the SFT loss on these prompts' demonstrations (None: the batch's)."""

    name: str = "sft_grad_norm"
    ids: tuple[str, ...] | None = None


Op = RLUpdate | SFTUpdate | MixedUpdate | Sync | Eval | Checkpoint
UPDATES = (RLUpdate, SFTUpdate, MixedUpdate)


class Schedule:
    class Args(BaseModel):
        model_config = ConfigDict(extra="forbid")

    #: How many weight versions old the rollouts behind ``signals`` may be (with
    #: ``rollout.max_staleness: k`` a step's rollouts come from weights up to k versions old);
    #: None: any. A schedule that must see the current policy's rewards sets 0.
    max_staleness: int | None = None

    def __init__(self, **kwargs):
        self.args = self.Args(**kwargs)

    def wants_rollouts(self, step: int) -> bool:
        return True

    def probes(self, step: int, signals: StepSignals) -> list[Probe]:
        """Learner probes to run before ``decide`` (default: none)."""
        return []

    def decide(self, step: int, signals: StepSignals) -> list[Op]:
        raise NotImplementedError

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class RL(Schedule):
    """GRPO on every step's rollouts."""

    def decide(self, step, signals):
        return [RLUpdate()]


class SFT(Schedule):
    """SFT on every step's demonstrations; no rollouts are generated."""

    def wants_rollouts(self, step):
        return False

    def decide(self, step, signals):
        return [SFTUpdate()]


class Phase(BaseModel):
    model_config = ConfigDict(extra="forbid")
    policy: str = Field(description="rl, sft, or an import path")
    steps: int = Field(gt=0)
    args: dict[str, Any] = Field(default_factory=dict)


class Phases(Schedule):
    """Run schedules one after another, e.g. SFT warm-up then RL (ReFT-style). Each phase
    sees steps counted from its own start; an Eval closes each phase."""

    class Args(BaseModel):
        model_config = ConfigDict(extra="forbid")
        phases: list[Phase] = Field(min_length=1)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.policies = [build_schedule(p.policy, p.args, f"schedule.args.phases.{i}")
                         for i, p in enumerate(self.args.phases)]
        self.current = 0

    def _phase(self, step: int) -> tuple[int, int]:
        start = 0
        for i, p in enumerate(self.args.phases):
            if step <= start + p.steps:
                return i, step - start
            start += p.steps
        return len(self.args.phases) - 1, step - start + self.args.phases[-1].steps

    def wants_rollouts(self, step):
        i, local = self._phase(step)
        return self.policies[i].wants_rollouts(local)

    def probes(self, step, signals):
        i, local = self._phase(step)
        return self.policies[i].probes(local, signals)

    def decide(self, step, signals):
        i, local = self._phase(step)
        self.current = i
        ops = list(self.policies[i].decide(local, signals))
        if local == self.args.phases[i].steps and i < len(self.policies) - 1:
            ops += [Sync(), Eval()]
        return ops

    def metrics(self):
        return {"schedule/phase": float(self.current)}

    def state_dict(self):
        return {"phases": [p.state_dict() for p in self.policies]}

    def load_state_dict(self, state):
        for p, s in zip(self.policies, state.get("phases", [])):
            p.load_state_dict(s)


BUILTINS = {"rl": "orchestrator.schedules:RL", "sft": "orchestrator.schedules:SFT",
            "phases": "orchestrator.schedules:Phases", "relift": "orchestrator.hybrid:ReLIFT",
            "sasr": "orchestrator.hybrid:SASR", "hpt": "orchestrator.hybrid:HPT",
            "luffy": "orchestrator.hybrid:LUFFY", "chord": "orchestrator.hybrid:CHORD",
            "rft": "orchestrator.hybrid:RFT"}


def build_schedule(policy: str, args: dict, where: str = "schedule") -> Schedule:
    cls = resolve(policy, f"{where}.policy", aliases=BUILTINS)
    for method in ("decide", "wants_rollouts", "probes", "metrics", "state_dict",
                   "load_state_dict"):
        if not callable(getattr(cls, method, None)):
            raise RecipeError(f"{where}.policy: {policy!r} has no {method}() method")
    arg_model = getattr(cls, "Args", None)
    if arg_model is not None:
        validate_model(arg_model, args, f"{where}.args")
    with user_code(f"{where}.policy", policy):
        return cls(**args)
