"""Reference worker: log-probs of given tokens under the frozen initial policy (for the KL term).

Plain torch on CPU (and on a GPU when the actor has one); the weights never change.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from workers.base import ReferenceWorker


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

    def logprobs(self, rollouts, temperature: float | None = None) -> list[list[float]]:
        """Per completion token, aligned with ``rollouts.completion_ids``."""
        import torch

        from workers.learner.losses import pack, token_logprobs

        t = temperature or self.recipe.sampling.temperature or 1.0
        out: list[list[float]] = []
        mb = self.args.micro_batch_size
        with torch.no_grad():
            for s in range(0, len(rollouts), mb):
                p, c = rollouts.prompt_ids[s:s + mb], rollouts.completion_ids[s:s + mb]
                b = pack(p, c, self.pad_id)
                logits = self.model(input_ids=b.input_ids.to(self.device),
                                    attention_mask=b.attention_mask.to(self.device)).logits
                logp, _ = token_logprobs(logits, b.input_ids.to(self.device), t)
                for i, (pi, ci) in enumerate(zip(p, c)):
                    out.append(logp[i, len(pi) - 1:len(pi) - 1 + len(ci)].tolist())
        return out
