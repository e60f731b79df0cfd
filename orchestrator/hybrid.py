"""Hybrid SFT/RL schedules: ReLIFT, SASR, HPT, LUFFY, CHORD, and rejection-sampling
fine-tuning (RFT: STaR, RAFT).

Each is a pure policy over the step's signals (see ``orchestrator/schedules.py``); specs and
the official code's hyper-parameters are summarised in docs/schedules.md. Their state —
buffers, counters, RNG — is plain data returned by ``state_dict``.
"""

from __future__ import annotations

import math
import random

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.schedules import MixedUpdate, Probe, RLUpdate, Schedule, SFTUpdate


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReLIFT(Schedule):
    """RL every step; prompts that no sample solved and that have a demonstration enter a
    newest-first buffer; when it holds ``buffer_size``, one SFT step on them with an optimizer
    state of its own (Ma et al., 2025, "Learning What RL Can't")."""

    class Args(_Args):
        buffer_size: int = Field(64, gt=0, description="M: SFT fires when the buffer holds M")
        entropy: float = Field(0.0, description="alpha: entropy bonus of the SFT step")
        optimizer: str = Field("sft", description="optimizer state of the SFT steps")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.buffer: list[str] = []
        self.triggers = 0
        self.steps = 0
        self.hardest = 0.0

    def decide(self, step, signals):
        hardest = [p.id for p in signals.prompts if p.n_correct == 0 and p.has_demo]
        self.hardest = len(hardest) / max(len(signals.prompts), 1)
        self.buffer = hardest + [i for i in self.buffer if i not in set(hardest)]
        self.steps += 1
        ops = [RLUpdate()]
        m = self.args.buffer_size
        if len(self.buffer) >= m:
            batch, self.buffer = self.buffer[:m], self.buffer[m:]
            self.triggers += 1
            ops.append(SFTUpdate(ids=tuple(batch), entropy=self.args.entropy,
                                 optimizer=self.args.optimizer))
        return ops

    def metrics(self):
        return {"relift/buffer_depth": float(len(self.buffer)),
                "relift/sft_triggers": float(self.triggers),
                "relift/trigger_rate": self.triggers / max(self.steps, 1),
                "relift/hardest_frac": self.hardest}

    def state_dict(self):
        return {"buffer": list(self.buffer), "triggers": self.triggers, "steps": self.steps}

    def load_state_dict(self, state):
        self.buffer = list(state["buffer"])
        self.triggers, self.steps = int(state["triggers"]), int(state["steps"])


class SASR(Schedule):
    """Warm-up SFT, then per step SFT with probability p = g / (g + G_w), else GRPO; g is the
    SFT gradient norm on the batch's demonstrations (a probe: no weights change), G_w its mean
    over the warm-up (Chen et al., 2025). The p(t) form is a reconstruction: the paper's
    equation was not available to check."""

    class Args(_Args):
        warmup_steps: int = Field(10, ge=1)
        seed: int = 0

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rng = random.Random(self.args.seed)
        self.warm_norms: list[float] = []
        self.sft_steps = self.rl_steps = 0
        self.p = 1.0

    def wants_rollouts(self, step):
        return step > self.args.warmup_steps

    def probes(self, step, signals):
        return [Probe("sft_grad_norm")]

    def decide(self, step, signals):
        g = signals.probes.get("sft_grad_norm")
        if step <= self.args.warmup_steps:
            if g is not None:
                self.warm_norms.append(g)
            self.sft_steps += 1
            return [SFTUpdate()]
        g_w = sum(self.warm_norms) / max(len(self.warm_norms), 1)
        self.p = g / (g + g_w) if g is not None and g + g_w > 0 else 0.0
        if self.rng.random() < self.p:
            self.sft_steps += 1
            return [SFTUpdate()]
        self.rl_steps += 1
        return [RLUpdate()]

    def metrics(self):
        total = max(self.sft_steps + self.rl_steps, 1)
        return {"sasr/p_sft": self.p, "sasr/sft_rate": self.sft_steps / total,
                "sasr/warmup_grad_norm": sum(self.warm_norms) / max(len(self.warm_norms), 1)}

    def state_dict(self):
        return {"rng": self.rng.getstate(), "warm_norms": self.warm_norms,
                "sft_steps": self.sft_steps, "rl_steps": self.rl_steps}

    def load_state_dict(self, state):
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.warm_norms = list(state["warm_norms"])
        self.sft_steps, self.rl_steps = int(state["sft_steps"]), int(state["rl_steps"])


class HPT(Schedule):
    """Per-prompt routing in one step: prompts with at most ``switch_gate`` successes (and a
    demonstration) train on their demonstration, the rest on their rollouts (Lv et al., 2025)."""

    class Args(_Args):
        switch_gate: int = Field(0, ge=0)
        sft_coef: float = Field(1.0, ge=0)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.sft_frac = 0.0

    def decide(self, step, signals):
        sft = tuple(p.id for p in signals.prompts
                    if p.n_correct <= self.args.switch_gate and p.has_demo)
        rl = tuple(p.id for p in signals.prompts if p.id not in set(sft))
        self.sft_frac = len(sft) / max(len(signals.prompts), 1)
        terms = ([RLUpdate(ids=rl)] if rl else []) + \
            ([SFTUpdate(ids=sft, coef=self.args.sft_coef)] if sft else [])
        return [MixedUpdate(tuple(terms))] if terms else []

    def metrics(self):
        return {"hpt/sft_frac": self.sft_frac}


class LUFFY(Schedule):
    """Each prompt's demonstration joins its GRPO group as an off-policy sample, trained with
    the policy-shaped term -A * p / (p + gamma) (Yan et al., 2025)."""

    class Args(_Args):
        gamma: float = Field(0.1, gt=0)

    def decide(self, step, signals):
        return [RLUpdate(demos_in_group=True, gamma=self.args.gamma)]


class CHORD(Schedule):
    """One step on (1 - mu) * GRPO + mu * SFT; mu warms up linearly to ``mu_peak`` and decays
    by a cosine to ``mu_valley`` (CHORD-mu), or stays at ``mu_fixed``; ``phi`` weights each
    SFT token by p(1 - p) (CHORD-phi) (Zhang et al., 2025)."""

    class Args(_Args):
        mu_peak: float = Field(0.9, ge=0, le=1)
        mu_valley: float = Field(0.05, ge=0, le=1)
        warmup_steps: int = Field(0, ge=0)
        decay_steps: int = Field(200, gt=0)
        mu_fixed: float | None = Field(None, ge=0, le=1)
        phi: bool = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.mu = self.mu_at(1)

    def mu_at(self, step: int) -> float:
        a = self.args
        if a.mu_fixed is not None:
            return a.mu_fixed
        if step <= a.warmup_steps:
            return a.mu_peak * step / max(a.warmup_steps, 1)
        t = min((step - a.warmup_steps) / a.decay_steps, 1.0)
        return a.mu_valley + 0.5 * (a.mu_peak - a.mu_valley) * (1 + math.cos(math.pi * t))

    def decide(self, step, signals):
        self.mu = self.mu_at(step)
        weight = "p(1-p)" if self.args.phi else "none"
        return [MixedUpdate((RLUpdate(coef=1.0 - self.mu),
                             SFTUpdate(coef=self.mu, token_weight=weight)))]

    def metrics(self):
        return {"chord/mu": self.mu}


class RFT(Schedule):
    """Rejection-sampling fine-tuning (STaR, Zelikman et al. 2022; RAFT, Dong et al. 2023;
    ReFT's self-training baselines): SFT on the policy's own samples that the verifier
    accepts (reward >= ``threshold``), at most ``per_prompt`` distinct ones per prompt — no
    demonstrations needed. With ``rl_coef`` > 0, one step on rl_coef * the RL term (of
    ``algorithm.advantage`` and ``policy_loss``) + that SFT term."""

    class Args(_Args):
        threshold: float = Field(1.0, description="reward a sample needs to be trained on")
        per_prompt: int = Field(1, ge=1, description="distinct accepted samples per prompt")
        rl_coef: float = Field(0.0, ge=0, description="weight of an RL term in the same step")
        optimizer: str = Field("main", description="optimizer state of the step")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.accepted_frac = 0.0

    def decide(self, step, signals):
        a = self.args
        accepted = [p for p in signals.prompts if max(p.rewards, default=0.0) >= a.threshold]
        self.accepted_frac = len(accepted) / max(len(signals.prompts), 1)
        sft = SFTUpdate(source="samples", threshold=a.threshold, per_prompt=a.per_prompt)
        if a.rl_coef:
            return [MixedUpdate((RLUpdate(coef=a.rl_coef), sft), optimizer=a.optimizer)]
        return [SFTUpdate(source="samples", threshold=a.threshold, per_prompt=a.per_prompt,
                          optimizer=a.optimizer)] if accepted else []

    def metrics(self):
        return {"rft/accepted_frac": self.accepted_frac}
