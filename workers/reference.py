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
        micro_batch_size: int | None = Field(32, gt=0, description="most rows per forward")
        max_tokens_per_micro_batch: int | None = Field(
            16384, gt=0, description="most tokens per forward (rows packed without padding)")
        logprob_chunk_tokens: int | None = Field(
            1024, gt=0, description="tokens per pass through the vocabulary projection")
        attn_implementation: str | None = None
        threads: int | None = None

    def setup(self, **_) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from workers.learner.policy import TokenLogprobs, attn_implementation

        self.set_threads(self.args.threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        model_cfg = self.recipe.model
        dtype = getattr(torch, model_cfg.dtype)
        lm = AutoModelForCausalLM.from_pretrained(
            model_cfg.path, dtype=dtype,
            attn_implementation=attn_implementation(self.args.attn_implementation, dtype))
        self.model = TokenLogprobs(lm, self.args.logprob_chunk_tokens).to(self.device).eval()
        tok = AutoTokenizer.from_pretrained(model_cfg.path)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def logprobs(self, rollouts, temperature: float | None = None,
                 shard: tuple[int, int] = (0, 1)) -> list[list[float]]:
        """Per completion token, aligned with ``completion_ids`` of the ``shard[0]``-th of
        ``shard[1]`` slices of the rollouts (a Rollouts, or refs to its parts). Every replica
        takes a slice of the step's samples; the learner ranks concatenate the slices. Micro-
        batches are packed by length under a token budget, without padding."""
        import torch

        from workers.learner.packing import micro_batches, pack, unpack

        r, _ = Rollouts.gather(rollouts).shard(*shard)
        t = temperature or self.recipe.sampling.temperature or 1.0
        # the sequences read: a sample, or each turn of a step-wise trajectory
        seqs = [(i, p, r.completion_ids[i][a:b]) for i in range(len(r))
                for p, a, b in r.segments(i)]
        lengths = [len(p) + len(c) for _, p, c in seqs]
        parts: list[list[float]] = [[] for _ in seqs]
        args = self.args
        with torch.no_grad():
            for rows in micro_batches(list(range(len(seqs))), lengths,
                                      args.max_tokens_per_micro_batch, args.micro_batch_size):
                b = pack([seqs[k][1] for k in rows], [seqs[k][2] for k in rows], self.pad_id)
                logp, _ = self.model(b.to(self.device), t)
                for k, lp in zip(rows, unpack(logp, b, len(rows))):
                    parts[k] = lp
        out: list[list[float]] = [[] for _ in range(len(r))]
        for (i, _, _), lp in zip(seqs, parts):
            out[i] += lp
        return out
