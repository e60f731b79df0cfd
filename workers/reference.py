"""Reference worker: log-probs of given tokens under the frozen initial policy (for the KL term).

Plain torch on CPU (and on a GPU when the actor has one); the weights never change.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from workers.base import ReferenceWorker
from workers.types import Rollouts


class HFReference(ReferenceWorker):
    class Args(BaseModel):
        model_config = ConfigDict(extra="forbid")
        micro_batch_size: int = Field(32, gt=0)
        threads: int | None = None

    def setup(self, **_) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.set_threads(self.args.threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        model_cfg = self.recipe.model
        self.model = AutoModelForCausalLM.from_pretrained(
            model_cfg.path, dtype=getattr(torch, model_cfg.dtype)).to(self.device).eval()
        tok = AutoTokenizer.from_pretrained(model_cfg.path)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def logprobs(self, rollouts, temperature: float | None = None,
                 shard: tuple[int, int] = (0, 1)) -> list[list[float]]:
        """Per completion token, aligned with ``completion_ids`` of the ``shard[0]``-th of
        ``shard[1]`` slices of the rollouts (a Rollouts, or refs to its parts). Every replica
        takes a slice of the step's samples; the learner ranks concatenate the slices. Micro-
        batches are formed by length, so short samples are not padded to long ones."""
        import torch

        from workers.learner.losses import pack, token_logprobs

        r, _ = Rollouts.gather(rollouts).shard(*shard)
        t = temperature or self.recipe.sampling.temperature or 1.0
        order = sorted(range(len(r)), key=lambda i: len(r.prompt_ids[i]) + len(r.completion_ids[i]))
        out: list[list[float]] = [[] for _ in order]
        mb = self.args.micro_batch_size
        with torch.no_grad():
            for s in range(0, len(order), mb):
                rows = order[s:s + mb]
                p = [r.prompt_ids[i] for i in rows]
                c = [r.completion_ids[i] for i in rows]
                b = pack(p, c, self.pad_id)
                logits = self.model(input_ids=b.input_ids.to(self.device),
                                    attention_mask=b.attention_mask.to(self.device)).logits
                logp, _ = token_logprobs(logits, b.input_ids.to(self.device), t)
                for k, (i, pi, ci) in enumerate(zip(rows, p, c)):
                    out[i] = logp[k, len(pi) - 1:len(pi) - 1 + len(ci)].tolist()
        return out
