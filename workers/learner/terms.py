"""The loss terms of a learner update: one class per kind, each owning its rows and its loss.

The controller builds them (``orchestrator/updates.py``), Ray ships them to every rank, and
the learner (``deepspeed.py: update``) runs one optimizer step over their weighted sum: each
term is normalised over its own global token (or sequence) count, or, with a shared ``joint``
key, over the count of all the terms with that key (LUFFY's on- and off-policy samples are
one token mean). A term's rows carry their loss masks: a multi-turn trajectory's environment
tokens, and a multi-turn demonstration's non-assistant ones, weigh 0 in every loss, every
aggregation and every metric.

    PolicyGradient  the policy's own samples, PPO-clip (or ``algorithm.policy_loss``)
    OffPolicyPG     LUFFY's demonstrations, the policy-shaped off-policy term
    SFT             negative log-likelihood of demonstrations (CHORD-phi token weights)
    SampleSFT       the same on the policy's accepted samples (RFT)
    Value           the critic's clipped value loss on GAE returns

Rollouts may travel as Ray refs; ``resolved()`` fetches them once per update. A new kind is a
subclass with ``rows`` and ``loss`` (and ``Args``-free: its fields are its arguments).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from workers.types import Rollouts, resolve_refs

# per-token inputs of a row, checked against its completion's length (``Rows.check``)
_PER_TOKEN = {"old_logprobs": "behaviour log-probs", "ref_logprobs": "reference log-probs",
              "returns": "returns", "old_values": "old values"}


@dataclass
class Rows:
    """A term's rows, resolved: prompt and completion ids, loss masks (None: every completion
    token is trained on) and the per-row inputs ``packing.pack`` takes by name."""

    prompts: list[list[int]]
    completions: list[list[int]]
    masks: list | None = None
    inputs: dict[str, list] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def pick(self, idx: list[int]) -> Rows:
        def sub(xs):
            return [xs[i] for i in idx] if xs is not None else None

        return Rows(sub(self.prompts), sub(self.completions), sub(self.masks),
                    {k: sub(v) for k, v in self.inputs.items()})

    def split(self, segments: list[list[tuple[list[int], int, int]]]) -> Rows:
        """Each row as the sequences its ``segments`` name — (prompt, start, end) of its
        completion, ``Rollouts.segments`` — with its mask and per-token inputs cut alike and its
        per-row ones (an advantage) repeated: a step-wise trajectory's turns."""
        out = Rows([], [], [] if self.masks is not None else None,
                   {k: [] if v is not None else None for k, v in self.inputs.items()})
        for i, segs in enumerate(segments):
            for prompt, a, b in segs:
                out.prompts.append(prompt)
                out.completions.append(self.completions[i][a:b])
                if out.masks is not None:
                    m = self.masks[i]
                    out.masks.append(m[a:b] if m is not None else None)
                for k, xs in self.inputs.items():
                    if xs is not None:
                        x = xs[i]
                        out.inputs[k].append(x[a:b] if isinstance(x, (list, tuple)) else x)
        return out

    def counts(self) -> list[float]:
        """Each row's completion tokens that count (loss mask 1)."""
        masks = self.masks or [None] * len(self)
        return [float(sum(m) if m is not None else len(c))
                for c, m in zip(self.completions, masks)]

    def check(self) -> Rows:
        """Every row has a prompt, and per-token inputs as long as its completion — checked
        identically on every rank, so a bad row raises before any collective."""
        for i, (p, c) in enumerate(zip(self.prompts, self.completions)):
            if not p:
                raise ValueError(f"learner row {i} has an empty prompt")
            if self.masks is not None and self.masks[i] is not None and \
                    len(self.masks[i]) != len(c):
                raise ValueError(f"learner row {i}: {len(self.masks[i])} loss-mask values "
                                 f"for {len(c)} completion tokens")
            for key, what in _PER_TOKEN.items():
                xs = self.inputs.get(key)
                if xs is not None and xs[i] and len(xs[i]) != len(c):
                    raise ValueError(f"learner row {i}: {len(xs[i])} {what} for {len(c)} "
                                     "completion tokens")
        return self


@dataclass(kw_only=True)
class Term:
    coef: float = 1.0
    joint: str | None = None  # terms with the same key share one normaliser

    name: ClassVar[str]            # metric prefix: rl/..., off/..., sft/..., value/...
    update_name: ClassVar[str] = "rl"  # an update of this kind alone reports as sft/critic/rl
    sampled: ClassVar[bool] = False    # the policy's temperature, entropy bonus and loss_agg
    ppo: ClassVar[bool] = False        # cut into PPO mini-batches and epochs

    def __len__(self) -> int:
        raise NotImplementedError

    def resolved(self) -> Term:
        """The term with its Ray refs fetched."""
        return self

    def rows(self) -> Rows:
        raise NotImplementedError

    def take(self, idx: list[int]) -> Term:
        """The term restricted to ``idx`` (indices into its own rows): a PPO mini-batch."""
        raise NotImplementedError

    def loss(self, out, batch, learner) -> tuple[Any, dict]:
        """Per-token loss [N] of the packed micro-batch ``batch`` from the model's output
        ``out`` (log-probs; the critic's values), and per-token diagnostics [N] reported as
        token means."""
        raise NotImplementedError

    def entropy_coef(self, algo) -> float:
        return algo.entropy if self.sampled else 0.0

    def loss_agg(self, algo) -> str:
        return algo.loss_agg if self.sampled else "token_mean"


@dataclass(kw_only=True)
class _Given(Term):
    """Rows given in the term: demonstrations (prompt ids as the engines see them)."""

    prompts: list[list[int]]
    completions: list[list[int]]
    masks: list | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def rows(self) -> Rows:
        return Rows(self.prompts, self.completions, self.masks, self._inputs()).check()

    def _inputs(self) -> dict:
        return {}

    def take(self, idx: list[int]) -> Term:
        r = Rows(self.prompts, self.completions, self.masks, self._inputs()).pick(idx)
        return replace(self, prompts=r.prompts, completions=r.completions, masks=r.masks,
                       **r.inputs)


@dataclass(kw_only=True)
class _OnRollouts(Term):
    """Rows of this step's rollouts (refs or ``Rollouts``), ``select`` of them (None: all)."""

    rollouts: Any
    select: list[int] | None = None

    def _all(self) -> int:
        """Rows before the selection (known without fetching the rollouts)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.select) if self.select is not None else self._all()

    def _idx(self) -> list[int]:
        return list(self.select) if self.select is not None else list(range(self._all()))

    def resolved(self) -> Term:
        return replace(self, rollouts=Rollouts.gather(self.rollouts))

    def _inputs(self, r: Rollouts) -> dict:
        return {}

    def rows(self) -> Rows:
        r, idx = self.rollouts, self._idx()
        masks = [r.mask(i) for i in idx] if r.multi_turn else None
        whole = Rows(r.prompt_ids, r.completion_ids, None, self._inputs(r))
        rows = replace(whole.pick(idx), masks=masks)
        if any(r.turn_prompts or []):  # step-wise trajectories: each turn a sequence
            rows = rows.split([r.segments(i) for i in idx])
        return rows.check()

    def take(self, idx: list[int]) -> Term:
        base = self._idx()
        return replace(self, select=[base[i] for i in idx])


class _NLL:
    """Negative log-likelihood, optionally CHORD-phi weighted, with its own entropy bonus."""

    name: ClassVar[str] = "sft"
    update_name: ClassVar[str] = "sft"
    token_weight: str
    entropy: float

    def loss(self, out, batch, learner):
        from workers.learner import losses

        return losses.sft_loss(out, self.token_weight), {}

    def entropy_coef(self, algo) -> float:
        return float(self.entropy)


@dataclass(kw_only=True)
class SFT(_NLL, _Given):
    """SFT on demonstrations."""

    token_weight: str = "none"  # or "p(1-p)" (CHORD-phi)
    entropy: float = 0.0


@dataclass(kw_only=True)
class SampleSFT(_NLL, _OnRollouts):
    """SFT on the policy's own accepted samples (rejection-sampling fine-tuning)."""

    token_weight: str = "none"
    entropy: float = 0.0

    def _all(self) -> int:
        raise ValueError("an SFT term on samples names its rows (select)")


@dataclass(kw_only=True)
class PolicyGradient(_OnRollouts):
    """The policy-gradient loss on the policy's own samples: ``advantages`` per row of the
    rollouts (one number, or one per token), ``ref`` the reference's log-probs (refs, one
    part per engine share, or None without KL)."""

    advantages: list
    ref: Any = None
    name: ClassVar[str] = "rl"
    sampled: ClassVar[bool] = True
    ppo: ClassVar[bool] = True

    def _all(self) -> int:
        return len(self.advantages)

    def resolved(self) -> Term:
        ref = None if self.ref is None else [lp for part in resolve_refs(self.ref)
                                             for lp in part]
        return replace(self, rollouts=Rollouts.gather(self.rollouts), ref=ref)

    def _inputs(self, r: Rollouts) -> dict:
        return {"advantages": self.advantages, "old_logprobs": r.logprobs,
                "ref_logprobs": self.ref}

    def loss(self, out, batch, learner):
        from workers.learner import losses

        return losses.policy_gradient_loss(learner.policy_loss, out, batch,
                                           learner.recipe.algorithm)


@dataclass(kw_only=True)
class OffPolicyPG(_Given):
    """LUFFY's off-policy term on demonstrations: -A f(pi), f(p) = p / (p + gamma)."""

    advantages: list
    gamma: float = 0.1
    name: ClassVar[str] = "off"
    sampled: ClassVar[bool] = True

    def _inputs(self) -> dict:
        return {"advantages": self.advantages}

    def loss(self, out, batch, learner):
        from workers.learner import losses

        return losses.off_policy_pg_loss(out, batch.advantages, self.gamma), {}


@dataclass(kw_only=True)
class Value(_OnRollouts):
    """The critic's term: per-token ``returns`` and ``old_values`` (its values before the
    update) for every row of the rollouts."""

    returns: list
    old_values: list
    name: ClassVar[str] = "value"
    update_name: ClassVar[str] = "critic"
    ppo: ClassVar[bool] = True

    def _all(self) -> int:
        return len(self.returns)

    def _inputs(self, r: Rollouts) -> dict:
        return {"returns": self.returns, "old_values": self.old_values}

    def loss(self, out, batch, learner):
        from workers.learner.critic import value_loss

        per_token, clipped = value_loss(out, batch.returns, batch.old_values,
                                        learner.recipe.algorithm.value_clip)
        v = out.detach()
        return per_token, {"clipfrac": clipped, "value_mean": v, "return_mean": batch.returns,
                           "error": (v - batch.returns).abs()}
