"""Rollouts ahead of the learner, with bounded staleness (``rollout.max_staleness: k``).

k = 0 is lockstep: step t draws its prompts, generates, scores, learns and syncs, and the engines
idle while the learner works. With k > 0, at the start of step t the engines are handed the
prompts of steps t+1..t+k (after step t's own, if it has none yet), so they generate while step
t scores, learns and syncs. (Scoring
waits until the step is taken: a reward actor blocked on rollouts still being generated would
hold up every other call to it — LUFFY's scoring of demonstrations, eval.)

``VLLMRollout``'s actor runs its calls in order, so step s's generation is queued before every
sync that follows: it runs under the weights the engines had when it was submitted — the
controller's version then — and reaches the learner at most k syncs later (a step that syncs more
than once could make it older: such rollouts are regenerated, and counted).
Which weights a step's rollouts come from is therefore fixed by the schedule of steps, not by
timing, and a run is as reproducible at k = 1 as at k = 0. (On ``AsyncVLLMRollout`` it depends
on timing; a step's version is its oldest token's, and the same bound holds.)

The schedule still decides every step, on the signals of rollouts up to k versions old; a
schedule whose ``max_staleness`` is lower than the recipe's refuses the recipe. A step whose
``wants_rollouts`` turns False after its rollouts were requested discards them (counted).
A checkpoint holds the steps in flight — their prompts, rollouts and scores — so a resumed run
trains on exactly what the uninterrupted one would have (orchestrator/checkpoint.py).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import RecipeError
from orchestrator.groups import WorkerError
from orchestrator.metrics import Timings


@dataclass
class Ahead:
    """A step whose prompts were drawn early: its generation possibly in flight (``pairs``: Ray
    refs), or already fetched and scored (``gen``: at a checkpoint, and after a resume)."""

    batch: list[dict]
    metrics: dict
    pairs: list | None = None
    gen: dict | None = field(default=None, repr=False)


class RolloutPipeline:
    FILE = "inflight.pkl"

    def __init__(self, c):
        self.c = c
        self.k = c.recipe.rollout.max_staleness
        self.ahead: dict[int, Ahead] = {}
        self.regenerated = self.discarded = 0

    # --- the two calls of a step -----------------------------------------------------------
    def take(self, step: int, timer) -> tuple[list[dict], dict, dict | None]:
        """This step's prompts, data metrics and scored rollouts (None: the schedule wants
        none) — from work submitted earlier, or generated now. The next k steps are handed to
        the engines first, so they generate while this step is scored and learnt."""
        c = self.c
        work = self.ahead.pop(step, None)
        if work is None:
            work = Ahead(*c.next_batch(step))
            if c.schedule.wants_rollouts(step):
                work.pairs = c.submit_generation(work.batch, step)
        self.submit_ahead(step)
        if not c.schedule.wants_rollouts(step):
            if work.pairs is not None or work.gen is not None:
                self.discarded += 1
            return work.batch, work.metrics, None
        gen = self._scored(step, work, timer)
        metrics = dict(work.metrics)
        if self.k:
            metrics |= {"rollout/staleness": float(c.version - gen["weight_version"]),
                        "rollout/spanning": float(gen.get("spanning", 0)),
                        "rollout/regenerated_total": float(self.regenerated),
                        "rollout/discarded_total": float(self.discarded)}
        return work.batch, metrics, gen

    def submit_ahead(self, step: int) -> None:
        """Hand the engines steps step+1..step+k (those not handed already)."""
        c = self.c
        for s in range(step + 1, min(step + self.k, c.recipe.steps) + 1):
            if s in self.ahead:
                continue
            work = self.ahead[s] = Ahead(*c.next_batch(s))
            if c.schedule.wants_rollouts(s):
                work.pairs = c.submit_generation(work.batch, s)

    def _scored(self, step: int, work: Ahead, timer) -> dict:
        """The step's rollouts, scored: the ones submitted for it if usable, else new ones."""
        c = self.c
        gen = self._fetch(work, timer)
        if gen is None:
            with timer("generate"):
                gen = c.generate(work.batch, step)
        if "scores" not in gen:
            with timer("reward"):
                gen["scores"] = c.score(gen, work.batch, step)
        work.gen, work.pairs = gen, None
        return gen

    def _fetch(self, work: Ahead, timer) -> dict | None:
        """The generation submitted for a step; None if there is none, its engine died on the
        way (the engine is replaced) or it is older than k — the last two counted."""
        from orchestrator.recovery import replace_dead

        c = self.c
        if work.gen is not None:  # fetched for a checkpoint, or restored from one
            gen = work.gen
        elif work.pairs is None:
            return None
        else:
            try:
                with timer("generate"):
                    gen = c.collect_generation(work.pairs)
            except WorkerError as err:
                # died (perhaps already replaced by the call that found it first), or its
                # results lost: generated again below
                if not (replace_dead(c, err) or err.died or err.lost):
                    raise
                self.regenerated += 1
                return None
        # older than k: a step synced more than once, or a resume with a smaller k
        if c.version - gen["weight_version"] > self.k:
            self.regenerated += 1
            return None
        return gen

    # --- checkpoints -----------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """The steps in flight — fetched and scored (the checkpoint waits for them) — and the
        counters, into ``folder/inflight.pkl``."""
        saved = {}
        for s, work in sorted(self.ahead.items()):
            gen = self._scored(s, work, Timings()) if work.pairs is not None else work.gen
            if gen is not None:
                gen = {k: v for k, v in gen.items() if k not in ("refs", "ref", "shards")} | {
                    "rollouts": self.c.fetch_rollouts(gen)}
            saved[s] = {"batch": work.batch, "metrics": work.metrics, "gen": gen}
        if self.k or saved:
            state = {"ahead": saved, "regenerated": self.regenerated,
                     "discarded": self.discarded}
            (folder / self.FILE).write_bytes(pickle.dumps(state))

    def load(self, folder: Path) -> None:
        """Restore what ``save`` wrote (checkpoints from before it have none: nothing ahead).
        Restored rollouts travel by value (``[Rollouts]`` where refs usually are)."""
        path = folder / self.FILE
        state = pickle.loads(path.read_bytes()) if path.is_file() else {}
        self.regenerated = state.get("regenerated", 0)
        self.discarded = state.get("discarded", 0)
        self.ahead = {}
        for s, w in state.get("ahead", {}).items():
            gen = w["gen"]
            if gen is not None:  # rollouts by value: nothing to lose, nothing to remake
                gen = {k: v for k, v in gen.items() if k != "rollouts"} | {
                    "refs": [gen["rollouts"]], "shards": [None]}
            self.ahead[int(s)] = Ahead(w["batch"], w["metrics"], gen=gen)

    def metrics(self) -> dict:
        return {"rollout/ahead": float(len(self.ahead))} if self.k else {}


def check_schedule(schedule, k: int, policy: str) -> None:
    """A schedule declares the staleness its signals tolerate (``max_staleness``; absent or
    None: any); a schedule made of others (``policies``, as ``phases``) tolerates their least."""
    def limits(s):
        own = getattr(s, "max_staleness", None)
        return ([own] if own is not None else []) + [
            x for sub in getattr(s, "policies", []) for x in limits(sub)]

    limit = min(limits(schedule), default=None)
    if limit is not None and k > limit:
        raise RecipeError(f"rollout.max_staleness: {k}, but schedule {policy!r} decides on "
                          f"rollouts at most {limit} weight version(s) old")
