"""The learner's state on disk: DeepSpeed's checkpoint plus every named optimizer state,
the step counters and the random-number state, per rank."""

from __future__ import annotations

from collections import defaultdict


class LearnerCheckpoint:
    """Mixed into ``DeepSpeedLearner``: needs ``self.engine``, ``self._opt_states``,
    ``self._step_counts``, ``self.steps``, ``self._state_keys()`` and
    ``self._torch_optimizer()``."""

    def save_state(self, path: str) -> None:
        """DeepSpeed checkpoint (model, main optimizer, per-rank ZeRO partitions) plus every
        other named optimizer state, one file per rank. Every rank must call it."""
        import torch

        tag = self.ctx.role  # "learner"; the critic's ranks write beside it as "critic"
        # DeepSpeed's `latest` file names the learner's (zero_to_fp32.py reads it)
        self.engine.save_checkpoint(path, tag=tag, save_latest=tag == "learner")
        keys = self._state_keys()
        extra = {name: [state.get(k) for k in keys]
                 for name, state in self._opt_states.items() if name != "main"}
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        torch.save({"states": extra, "counts": self._step_counts, "steps": self.steps,
                    "rng": rng}, f"{path}/{tag}/named_optimizers_rank{self.ctx.rank}.pt")

    def load_state(self, path: str) -> None:
        import torch

        tag = self.ctx.role
        self.engine.load_checkpoint(path, tag=tag, load_module_strict=True,
                                    load_optimizer_states=True, load_lr_scheduler_states=True)
        saved = torch.load(f"{path}/{tag}/named_optimizers_rank{self.ctx.rank}.pt",
                           weights_only=False)
        keys = self._state_keys()
        self._opt_states = {"main": self._torch_optimizer().state}
        for name, values in saved["states"].items():
            self._opt_states[name] = defaultdict(
                dict, {k: v for k, v in zip(keys, values, strict=True) if v is not None})
        self._step_counts, self.steps = dict(saved["counts"]), int(saved["steps"])
        rng = saved.get("rng") or {}
        if rng.get("torch") is not None:
            torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
