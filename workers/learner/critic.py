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

from collections import defaultdict

from pydantic import Field

from workers.base import CriticWorker
from workers.learner.deepspeed import DeepSpeedLearner
from workers.types import Rollouts


class DeepSpeedCritic(DeepSpeedLearner, CriticWorker):
    class Args(DeepSpeedLearner.Args):
        model: str | None = Field(None, description="model folder of the critic's backbone "
                                  "(default: model.path, the policy's start)")
        lr: float | None = Field(None, gt=0, description="default: algorithm.lr")

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
        import torch
        import torch.distributed as dist

        from workers.learner.packing import pack, plan, unpack

        r = Rollouts.gather(rollouts)
        algo = self.recipe.algorithm
        lengths = [len(p) + len(c) for p, c in zip(r.prompt_ids, r.completion_ids)]
        plans = plan(lengths, self.ctx.world_size, algo.max_tokens_per_micro_batch,
                     algo.micro_batch_size)
        mine: dict[int, list[float]] = {}
        self.engine.eval()
        with torch.no_grad():
            for rows in plans[self.ctx.rank]:  # [] pads this rank to the others' count
                batch = pack([r.prompt_ids[i] for i in rows], [r.completion_ids[i] for i in rows],
                             self.pad_id).to(self.engine.device)
                v, _ = self.engine(batch)
                if rows:
                    for i, vals in zip(rows, unpack(v.cpu(), batch, len(rows))):
                        mine[i] = vals
        parts: list = [None] * self.ctx.world_size
        dist.all_gather_object(parts, mine)
        if self.ctx.rank != 0:
            return None  # rank 0 returns every row; the others' copies would only travel
        out: list[list[float]] = [[] for _ in lengths]
        for part in parts:
            for i, vals in part.items():
                out[i] = vals
        return out

    def _rows(self, term: dict):
        if term["kind"] != "value":
            return super()._rows(term)
        r, sel = term["rollouts"], term.get("select")
        idx = list(range(len(r))) if sel is None else list(sel)
        return ([r.prompt_ids[i] for i in idx], [r.completion_ids[i] for i in idx],
                [term["returns"][i] for i in idx], [term["old_values"][i] for i in idx],
                None, None, len(idx))

    def _backward_term(self, term: dict, rows: tuple, total_tokens: float,
                       total_seqs: float) -> dict:
        """The clipped value loss over the term's rows: ``{"kind": "value", "rollouts",
        "returns": per-token lists, "old_values": per-token lists, "select": rows|None}``."""
        from workers.learner import losses
        from workers.learner.packing import pack, plan

        if term["kind"] != "value":
            raise ValueError(f"the critic trains value terms, not {term['kind']!r}")
        algo = self.recipe.algorithm
        prompts, completions, returns, old_values, _, _, n = rows
        if n == 0:
            raise ValueError("critic value term got no rows")
        world, device = self.ctx.world_size, self.engine.device
        lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
        plans = plan(lengths, world, algo.max_tokens_per_micro_batch, algo.micro_batch_size)
        sums: dict[str, float] = defaultdict(float)
        for mine in plans[self.ctx.rank]:
            def pick(xs, mine=mine):
                return [xs[i] for i in mine]

            batch = pack(pick(prompts), pick(completions), self.pad_id, returns=pick(returns),
                         old_values=pick(old_values)).to(device)
            v, _ = self.engine(batch)
            per_token, clipped = value_loss(v, batch.returns, batch.old_values, algo.value_clip)
            loss = losses.aggregate(per_token, batch, "token_mean", total_tokens,
                                    total_seqs) * world
            self.engine.backward(loss, scale_wrt_gas=False)
            w = batch.weight
            sums["loss"] += float(loss.detach()) / world
            sums["tokens"] += batch.n_tokens
            sums["clipfrac"] += float((clipped * w).sum())
            sums["value_mean"] += float((v.detach() * w).sum())
            sums["return_mean"] += float((batch.returns * w).sum())
            sums["error"] += float(((v.detach() - batch.returns).abs() * w).sum())
        return {f"value/{k}": v for k, v in sums.items()}

    def update(self, terms: list[dict], optimizer: str = "main", lr: float | None = None,
               probe: bool = False, step: int | None = None) -> dict:
        if any(t["kind"] != "value" for t in terms):
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
