"""The critic of PPO with a value model: its own DeepSpeed ZeRO-3 group, beside the learner's.

A critic rank is a learner rank (``DeepSpeedLearner``: the same packing, micro-batches, PPO
mini-batches and epochs, learning-rate schedule and checkpoints — written beside the learner's
under the tag ``critic``) whose model is a transformers token-classification model with one
output: the backbone of ``model.path`` (or ``args.model``) with a value head. Its ``values``
gives V(s_t) for every completion token — the value of the state *before* the token, read at
the position that predicts it — and its update regresses them on the GAE returns with the
clipped value loss (PPO; verl's ``compute_value_loss``):

    L_V = 1/2 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)

averaged over the global batch's tokens. ``algorithm.value_clip`` is c.
"""

from __future__ import annotations

from pydantic import Field

from workers.base import CriticWorker
from workers.learner.deepspeed import DeepSpeedLearner
from workers.learner.terms import Value


class DeepSpeedCritic(DeepSpeedLearner, CriticWorker):
    class Args(DeepSpeedLearner.Args):
        model: str | None = Field(None, description="model folder of the critic's backbone "
                                  "(default: model.path, the policy's start)")
        lr: float | None = Field(None, gt=0, description="default: algorithm.lr")

    def model_builder(self, default):
        from workers.learner.adapters import FullModel

        return FullModel()  # the value model trains in full (model.lora is the policy's)

    def model_class(self):
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification

    def model_path(self) -> str:
        return self.args.model or self.recipe.model.path

    def model_kwargs(self) -> dict:
        # no dropout before the value head (transformers' default is 0.1 when the config sets
        # none): the clipped value loss compares V with the values before the update
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.model_path(), num_labels=1)
        config.classifier_dropout = 0.0  # (a keyword above sets only fields the config has)
        return {"config": config}

    def setup(self, **kwargs) -> None:
        if self.args.model:  # the critic reads the policy's token ids: checked before building
            from transformers import AutoTokenizer

            mine = AutoTokenizer.from_pretrained(self.args.model).get_vocab()
            if mine != AutoTokenizer.from_pretrained(self.recipe.model.path).get_vocab():
                raise ValueError(f"roles.critic.args.model {self.args.model!r} has another "
                                 f"vocabulary than model.path {self.recipe.model.path!r}: the "
                                 "critic reads the policy's token ids")
        super().setup(**kwargs)

    def wrap(self, lm):
        from workers.learner.policy import TokenValues

        return TokenValues(lm)

    def base_lr(self, terms=None) -> float:
        return self.args.lr or self.recipe.algorithm.lr

    def values(self, rollouts) -> list[list[float]] | None:
        """V(s_t) for every completion token of every sample (a Rollouts, or refs to its
        parts), aligned with ``completion_ids``. Every critic rank must be called: each
        computes its share of rows (ZeRO-3 gathers parameters collectively); rank 0 returns
        every row, the others None."""
        return self._per_token(rollouts, lambda batch: self.engine(batch)[0])

    def update(self, terms: list, optimizer: str = "main", lr: float | None = None,
               probe: bool = False, step: int | None = None) -> dict:
        if not all(isinstance(t, Value) for t in terms):
            raise ValueError("the critic trains value terms only")
        out = super().update(terms, optimizer, lr, probe, step)
        return out | {"critic/updates": float(self.steps)}  # checkpointed: warm-up resumes


def value_loss(values, returns, old_values, clip: float | None):
    """Per token: 1/2 max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old, +-c);
    without ``clip``, 1/2 (V - R)^2. Also returns where the clipped term is the larger."""
    import torch

    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * unclipped, torch.zeros_like(unclipped)
    v_clip = old_values + (values - old_values).clamp(-clip, clip)
    clipped = (v_clip - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), (clipped > unclipped).float()
