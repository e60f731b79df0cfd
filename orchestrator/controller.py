"""The controller: owns the data cursor, the schedule, metrics and checkpoints, and drives the
worker groups. ``run()`` reads like the algorithm; everything else is small named steps.

Large data moves between actors as Ray object refs — rollouts go from the rollout engines to the
reward, reference and learner actors without passing through here. The controller fetches only
summaries: lengths, rewards, metrics.

Launch:  braid run recipes/arith_grpo_cpu.yaml   (or under `ray job submit ... -- braid run ...`)
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import checkpoint
from orchestrator.config import Recipe
from orchestrator.groups import WorkerError
from orchestrator.metrics import Timings, sparkline
from orchestrator.recovery import STOP, explain, recoverable
from orchestrator.schedules import UPDATES, Checkpoint, Eval, SFTUpdate, Sync
from orchestrator.signals import empty_signals, eval_rates, step_signals
from orchestrator.updates import learner_terms, sft_term
from workers.learner.terms import PolicyGradient


class Controller:
    def __init__(self, recipe: Recipe, recipe_yaml: str = "", resume: str | None = None):
        self.recipe, self.recipe_yaml, self.resume = recipe, recipe_yaml, resume
        self.start_step = 0
        self.run_dir = Path(recipe.run_dir)
        self.groups: dict = {}
        self.version = 0
        self.stale = False  # the learner's weights differ from the engines'
        self.history: dict[str, list] = {"reward": [], "eval": []}
        self.restarts: dict[str, int] = {}  # role -> actors replaced (orchestrator.recovery)
        self.saved_step: int | None = None  # step of the newest checkpoint (this process)
        self.critic = None  # PPO's value model (a worker group), when the recipe has one
        self.lost_remade = 0  # engine shares generated again because Ray lost their rollouts
        self.oom_kills: dict[str, int] = {}  # role -> times Ray's memory monitor killed it

    # --- the loop --------------------------------------------------------------------------
    def run(self) -> dict:
        try:
            if self.start_step == 0:
                self.evaluate(step=0)
            for step in range(self.start_step + 1, self.recipe.steps + 1):
                if STOP.requested:  # SIGTERM/SIGINT (orchestrator.recovery)
                    return self.stop(step - 1)
                self.train_step(step)
            return self.finish()
        except WorkerError as err:
            raise explain(self, err) from err

    def train_step(self, step: int) -> dict:
        timer = Timings()
        # generated now, or ahead (rollout.max_staleness > 0: the next steps' start here)
        batch, metrics, gen = self.rollouts.take(step, timer)
        if gen is not None and self.recipe.algorithm.dynamic_sampling:  # DAPO
            batch, gen, metrics = self.fill_groups(step, batch, gen, timer, metrics)
        self.demos.add(batch)
        signals = empty_signals(step)
        if gen is not None:
            self.check_unscored(step, gen["scores"])
            if self.teacher is not None:
                with timer("teacher"):
                    metrics |= self.ask_teacher(step, batch, gen)
            signals = step_signals(step, batch, gen["prompt_index"], gen["scores"].rewards,
                                   gen["lengths"], has_demo=self.demos.has)
            metrics |= self.rollout_metrics(gen, signals, batch)
        signals = self.run_probes(step, signals, batch)
        ops = self.complete(step, self.schedule.decide(step, signals))
        for op in ops:
            metrics |= self.execute(op, step, batch, gen, timer)
        return self.log(step, ops, metrics, timer)

    # --- named steps -----------------------------------------------------------------------
    def next_batch(self, step: int) -> tuple[list[dict], dict]:
        """This step's prompts; prompts too long for the engines were skipped and are counted."""
        before = self.cursor.skipped
        batch = self.cursor.next_batch(self.recipe.data.prompts_per_step)
        dropped = self.cursor.skipped - before
        if dropped and not before:
            self.logger.note(f"step {step}: {dropped} prompt(s) longer than "
                             f"{self.prompts.max_prompt_tokens} tokens (prompt.max_prompt_tokens)"
                             " dropped; counted in data/prompts_dropped")
        return batch, {"data/prompts_dropped": float(dropped),
                       "data/prompts_dropped_total": float(self.cursor.skipped)}

    def sampling(self, kind: str = "train") -> dict:
        """vLLM sampling arguments: 'train', 'greedy' (eval) or 'eval' (eval's k samples)."""
        s, ev = self.recipe.sampling, self.recipe.eval
        out = {"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens,
               "stop": list(s.stop)}
        if kind != "train":
            out["max_tokens"] = ev.max_tokens or s.max_tokens
        elif s.min_tokens:
            out["min_tokens"] = s.min_tokens
        if kind == "greedy":
            out |= {"temperature": 0.0, "top_p": 1.0}
        elif kind == "eval":
            out |= {"temperature": s.temperature if ev.temperature is None else ev.temperature,
                    "top_p": s.top_p if ev.top_p is None else ev.top_p}
        return out

    @recoverable
    def generate(self, records: list[dict], step: int, greedy: bool = False, n: int | None = None,
                 sampling: dict | None = None, group=None, prompts=None,
                 offset: int = 0) -> dict:
        """n samples per record (default: sampling.n with the training sampling; ``greedy``:
        one greedy sample) from the rollout engines, or from ``group`` (the teacher) with its
        ``prompts`` formatter. Sampling seeds derive from the run's seed and the step."""
        return self.collect_generation(self.submit_generation(
            records, step, greedy, n, sampling, group, prompts, offset), group)

    def submit_generation(self, records: list[dict], step: int, greedy: bool = False,
                          n: int | None = None, sampling: dict | None = None, group=None,
                          prompts=None, offset: int = 0) -> list[Shard]:
        """Start ``generate`` (arguments as there): one Shard per engine. ``offset``: the
        records follow that many others of the step (their prompt indices and sampling seeds
        start there)."""
        if greedy:
            n, sampling = 1, self.sampling("greedy")
        group, prompts = group or self.rollout, prompts or self.prompts
        # eval's samples draw seeds apart from the same step's training samples
        base = (self.recipe.seed * 1_000_003 + step) * 10_007 + (0 if sampling is None else 5003)
        sampling = (sampling or self.sampling()) | {"stop_token_ids": prompts.stop_token_ids}
        items = [{"prompt_ids": prompts.prompt_ids(r), "seed": base + offset + i}
                 for i, r in enumerate(records)]
        env = self.recipe.environment
        if env is not None and any(group is g for g in (self.rollout, self.teacher)):
            for item, r in zip(items, records):  # the engines run the environment on it
                item["record"] = r
                if env.thinking_history == "strip":  # re-rendered at each turn
                    item["messages"], item["tools"] = prompts.messages(r), prompts.tools
        n = n or self.recipe.sampling.n
        refs = group.split("generate", items, n, sampling, num_returns=2, offset=offset)
        return [Shard(group.role, rank, part, n, sampling, offset + first, *pair)
                for (rank, part, first), pair in zip(group.shards(items), refs)]

    def collect_generation(self, shards: list[Shard], group=None) -> dict:
        """Wait for the summaries of a submitted generation; the rollouts stay refs (``refs``,
        one per engine; ``shards`` says how each was asked for, to ask again)."""
        summaries = (group or self.rollout).call([s.summary for s in shards], "generate")
        return merge_summaries(summaries) | {"refs": [s.rollouts for s in shards],
                                             "shards": list(shards)}

    @recoverable
    def fetch_rollouts(self, gen: dict):
        """The rollouts of a generation, fetched here (a checkpoint holds the steps in
        flight); lost ones are made again."""
        import ray

        from workers.types import Rollouts

        try:
            return Rollouts.gather(gen["refs"])
        except ray.exceptions.RayError as err:
            group = self.groups[gen["shards"][0].role] if gen.get("shards") else self.rollout
            raise group.error(err, "fetch of rollouts") from err

    def remake_lost(self, gen: dict) -> int:
        """Generate again the engine shares of ``gen`` whose rollouts Ray lost (their node or
        owner gone, or their engine died before it answered), with the same prompts and seeds,
        on the same rank (its replacement, if it died); reference log-probs it lost are
        computed again. In place: loss terms built on the step's lists see the new refs.
        Shares that come out different (newer weights, an engine without per-request seeds)
        are fine before the step is scored, and an error after: the scores, and what the
        schedule decided on them, were of the lost samples. Returns the shares made again."""
        from orchestrator.recovery import replace_dead

        lost = [i for i, (ref, shard) in enumerate(zip(gen.get("refs", []),
                                                       gen.get("shards", [])))
                if shard is not None and self._gone(ref, self.groups[shard.role])]
        if lost:
            replace_dead(self, WorkerError("rollouts lost", "rollout", lost=True))
            shards = gen["shards"]
            for i in lost:
                old = shards[i]
                group = self.groups[old.role]
                pair = group.actors[old.rank].generate.options(num_returns=2).remote(
                    old.items, old.n, old.sampling, index_offset=old.offset)
                shards[i] = dataclasses.replace(old, summary=pair[0], rollouts=pair[1])
            again = self.collect_generation(shards, self.groups[shards[0].role])
            again.pop("shards")
            if "scores" in gen and any(again[k] != gen[k] for k in ("prompt_index", "texts")):
                raise WorkerError(
                    f"Ray lost the rollouts of {len(lost)} engine share(s) of a step already "
                    "scored, and generated again they differ (newer weights, or an engine "
                    "without per-request seeds): the step cannot be repeated as it was scored",
                    shards[0].role)
            gen["refs"][:] = again.pop("refs")
            gen |= again
            self.logger.note(f"Ray lost the rollouts of {len(lost)} engine share(s); generated "
                             "again with the same prompts and seeds")
            self.lost_remade += len(lost)
        group = self._reference_group()
        if group is not None and any(self._gone(r, group) for r in gen.get("ref") or []):
            gen["ref"][:] = self._reference_refs(gen)
            self.logger.note("Ray lost reference log-probs; computed again")
        return len(lost)

    @staticmethod
    def _gone(ref, group) -> bool:
        """Whether Ray lost the object ``ref`` (or the actor that was to make it died): fetched
        here to find out, on this failure path only. (Its locations cannot say: after a node
        died, the owner listed its engine's rollouts on the live head, and the reward actor
        there still could not fetch them — seen with two nodes on one machine.)"""
        import ray

        from orchestrator.groups import ray_failure

        if not isinstance(ref, ray.ObjectRef):
            return False  # restored from a checkpoint: a value
        try:
            ray.get(ref, timeout=group.deadlines.seconds("fetch") if group.deadlines else None)
            return False
        except ray.exceptions.GetTimeoutError:
            return False  # not lost, still being made: a hung maker meets its call's deadline
        except ray.exceptions.RayError as err:
            if ray_failure(err) == "error":
                raise group.error(err, "fetch of its results") from err
            return True

    def fill_groups(self, step: int, batch: list[dict], gen: dict, timer,
                    metrics: dict) -> tuple[list[dict], dict, dict]:
        """DAPO's dynamic sampling: while fewer than ``prompts_per_step`` groups have rewards
        that differ, draw, generate and score another batch of prompts (at most
        ``algorithm.dynamic_sampling`` batches in all); the RL update then trains on the first
        ``prompts_per_step`` such groups (``gen["train_prompts"]``) — fewer, and said, if the
        cap is reached first."""
        from workers.types import Scores

        want, cap = self.recipe.data.prompts_per_step, self.recipe.algorithm.dynamic_sampling
        batches = 1
        while True:
            informative = groups_with_signal(gen, self.recipe.scoring.unscored == "drop")
            if len(informative) >= want or batches >= cap:
                break
            more, m = self.next_batch(step)
            with timer("generate"):
                g = self.generate(more, step, offset=len(batch))
            batch = batch + more
            with timer("reward"):
                g["scores"] = self.score(g, batch, step)
            self.check_unscored(step, g["scores"])
            gen = merge_summaries([gen, g]) | {
                "refs": gen["refs"] + g["refs"], "shards": gen["shards"] + g["shards"],
                "scores": Scores.concat([gen["scores"], g["scores"]])}
            metrics = metrics | m | {"data/prompts_dropped": metrics.get(
                "data/prompts_dropped", 0.0) + m["data/prompts_dropped"]}
            batches += 1
        gen["train_prompts"] = set(informative[:want])
        if len(informative) < want:
            self.logger.note(f"step {step}: dynamic sampling found {len(informative)} of {want} "
                             f"groups with differing rewards in {cap} batches; training on those")
        return batch, gen, metrics | {"dapo/gen_batches": float(batches),
                                      "dapo/kept_groups": float(len(gen["train_prompts"]))}

    @recoverable
    def score(self, gen: dict, records: list[dict], step: int):
        from workers.types import Scores

        n = len(self.reward)
        refs = [a.score.remote(gen["refs"], records, shard=(k, n))
                for k, a in enumerate(self.reward.actors)]
        scores = Scores.concat(self.reward.call(refs, "score"))
        for name, error in scores.errors.items():  # the first failure of each verifier
            self.logger.note(f"step {step}: verifier {name} could not score "
                             f"{scores.failures.get(name, 0)} sample(s); first: {error}")
        return scores

    def check_unscored(self, step: int, scores) -> None:
        """Stop before training on a step whose rewards are mostly missing."""
        n, bad = len(scores.rewards), sum(r is None for r in scores.rewards)
        limit = self.recipe.scoring.max_unscored_frac
        if n and bad / n > limit:
            raise WorkerError(
                f"step {step}: {bad} of {n} samples could not be scored (failures per verifier: "
                f"{scores.failures}; e.g. {', '.join(scores.failed_ids[:5])}), more than "
                f"scoring.max_unscored_frac={limit}; the verifier logs name every sample. "
                "Nothing from this step was trained on.", "reward")

    @recoverable
    def reference_logprobs(self, gen: dict | None) -> list | None:
        """Refs to the reference log-probs of this step's rollouts, computed once; the learner
        fetches them by ref. (Fetched here too, so that a dead reference actor is found and
        replaced now rather than failing the learner's update.)"""
        if gen is None or self.recipe.algorithm.kl == 0 or self._reference_group() is None:
            return None
        if "ref" not in gen:
            gen["ref"] = self._reference_refs(gen)
        return gen["ref"]

    def _reference_group(self):
        """The reference role, or with LoRA adapters the learner (adapters disabled)."""
        if self.reference is None and self.recipe.model.lora is not None and \
                self.recipe.algorithm.kl > 0:
            return self.learner
        return self.reference

    def _reference_refs(self, gen: dict) -> list:
        if self.reference is None:  # the learner's ranks share the rows; rank 0 has them all
            refs = self.learner.fanout("reference_logprobs", gen["refs"])
            self.learner.call(refs, "reference_logprobs")
            return refs[:1]
        n = len(self.reference)
        refs = [a.logprobs.remote(gen["refs"], shard=(k, n))
                for k, a in enumerate(self.reference.actors)]
        self.reference.call(refs, "logprobs")
        return refs

    def critic_values(self, gen: dict) -> list[list[float]]:
        """The critic's V(s_t) for every completion token of this step's samples (computed
        once a step)."""
        if "values" not in gen:
            gen["values"] = self.critic.call(self.critic.fanout("values", gen["refs"]),
                                             "values")[0]
        return gen["values"]

    def train_critic(self, step: int, gen: dict | None, timer) -> dict:
        """The critic's update on the returns of this step's samples (PPO with a critic)."""
        term = gen.pop("critic_term", None) if gen is not None else None
        if term is None:
            return {}
        with timer("critic"):
            return self.learn(self.critic, [term], step, gen)

    def complete(self, step: int, ops: list) -> list:
        """Add what the recipe's cadence asks for: a Sync after weight changes, Eval, Checkpoint."""
        ops = list(ops)
        if any(isinstance(o, UPDATES) for o in ops):
            last_update = max(i for i, o in enumerate(ops) if isinstance(o, UPDATES))
            if not any(isinstance(o, Sync) for o in ops[last_update:]):
                ops.insert(last_update + 1, Sync())
        ev, ck = self.recipe.eval.every, self.recipe.checkpoint.every
        if ev and step % ev == 0 and step != self.recipe.steps and Eval() not in ops:
            ops.append(Eval())
        if ck and step % ck == 0 and Checkpoint() not in ops:
            ops.append(Checkpoint())
        return ops

    def execute(self, op, step: int, batch: list[dict], gen: dict | None, timer) -> dict:
        if isinstance(op, UPDATES):
            if gen is not None and self._reference_group() is not None:
                with timer("reference"):
                    self.reference_logprobs(gen)
            if gen is not None and self.critic is not None:
                with timer("critic"):
                    self.critic_values(gen)
            terms = learner_terms(self, op, batch, gen, step)
            out = self.train_critic(step, gen, timer)
            if out.get("critic/updates", math.inf) <= self.recipe.algorithm.critic_warmup:
                terms = [t for t in terms if not isinstance(t, PolicyGradient)]  # critic alone
            if not terms:
                return out | {"update/skipped": 1.0}
            with timer("learn"):
                out |= self.learn(self.learner, terms, step, gen, op.optimizer)
            self.stale = True
            return out
        if isinstance(op, Sync):
            with timer("sync"):
                return self.sync_weights()
        if isinstance(op, Eval):
            with timer("eval"):
                return self.evaluate(step)
        if isinstance(op, Checkpoint):
            with timer("checkpoint"):
                checkpoint.save(self, step)
            return {}
        raise TypeError(f"step {step}: the schedule returned an unknown op {op!r}")

    def learn(self, group, terms: list, step: int, gen: dict | None,
              optimizer: str = "main") -> dict:
        """An update of the learner (or the critic) ``group`` on ``terms``. Rollouts or
        reference log-probs Ray lost before its ranks fetched them are made again (the same
        samples, under the same seeds and weights: the terms hold the step's lists of refs,
        updated in place) and the update is sent again."""
        from orchestrator.recovery import LOST_RETRIES

        for attempt in range(LOST_RETRIES + 1):
            try:
                return group.call(group.fanout("update", terms, optimizer, step=step),
                                  "update")[0]
            except WorkerError as err:
                # every rank raised it together, before any collective (InputsLost): the
                # update is whole to send again once its inputs are
                if not (err.lost and gen is not None and attempt < LOST_RETRIES):
                    raise
                self.remake_lost(gen)
        raise AssertionError("unreachable")

    def ask_teacher(self, step: int, batch: list[dict], gen: dict) -> dict:
        """Demonstrations for prompts no sample solved and that have none: the teacher
        samples, the reward verifies, the first correct sample is stored."""
        solved = {p for p, r in zip(gen["prompt_index"], gen["scores"].rewards)
                  if (r or 0.0) >= 1.0}
        todo = [batch[p] for p in sorted(set(gen["prompt_index"]) - solved)
                if not self.demos.has(batch[p]["id"]) and self.teacher_prompts.fits(batch[p])
                ][:self.recipe.teacher.max_prompts]
        if not todo:
            return {"teacher/asked": 0.0, "teacher/accepted": 0.0}
        t = self.generate(todo, step, n=self.recipe.teacher.samples, group=self.teacher,
                          prompts=self.teacher_prompts)
        if self.recipe.environment is None:
            rewards = self.score_texts([todo[p] for p in t["prompt_index"]], t["texts"])
            demos = [text.strip() for text in t["texts"]]
        else:  # trajectories: scored as the policy's are, kept as their chat messages
            rewards = self.score(t, todo, step).rewards
            demos = [info["messages"] for info in self.fetch_rollouts(t).env_info]
        accepted = {}
        for p, demo, r in zip(t["prompt_index"], demos, rewards):
            if (r or 0.0) >= 1.0 and p not in accepted:
                accepted[p] = dict(todo[p], demonstration=demo)
        self.demos.add(list(accepted.values()), owned=True)
        return {"teacher/asked": float(len(todo)), "teacher/accepted": float(len(accepted))}

    def run_probes(self, step: int, signals, batch: list[dict]):
        for probe in self.schedule.probes(step, signals):
            if probe.name != "sft_grad_norm":
                raise ValueError(f"step {step}: unknown probe {probe.name!r}")
            term = sft_term(self, SFTUpdate(ids=probe.ids), batch, peek=True)
            if term is not None:
                refs = self.learner.fanout("update", [term], probe=True)
                signals.probes[probe.name] = self.learner.call(refs, "probe")[0]["probe/grad_norm"]
        return signals

    @recoverable
    def score_texts(self, records: list[dict], texts: list[str]) -> list[float | None]:
        """Verifier rewards of given completions (demonstrations), one per record (None: no
        verifier could score it)."""
        from workers.types import Rollouts

        n = len(records)
        if not n:
            return []
        r = Rollouts(list(range(n)), [[]] * n, [[]] * n, [[]] * n, texts, ["stop"] * n)
        scores = self.reward.call([self.reward.actors[0].score.remote(r, records)], "score")[0]
        return list(scores.rewards)

    @recoverable
    def sync_weights(self, resend: bool = False) -> dict:
        """Learner weights to every engine under a new version (``resend``: the current one,
        unless the learner moved on since — used when an engine was replaced)."""
        if not (resend or self.stale):  # nothing changed the weights since the last sync
            return {}
        version = self.version if resend and not self.stale else self.version + 1
        refs = self.learner.fanout("push_weights", version)
        recv = self.rollout.fanout("receive_weights", version)
        # a hung engine holds the push: killed once the learner's broadcast has given up
        self.rollout.await_with(recv, refs, "receive_weights", self.recipe.weight_sync.timeout_s)
        out = self.learner.call(refs, "push_weights")[0]
        self.rollout.call(recv, "receive_weights")
        self.version, self.stale = version, False
        return out

    def evaluate(self, step: int) -> dict:
        """Held-out accuracy: greedy (``eval/accuracy``) and, with ``eval.samples: k``, the
        mean accuracy of k samples (``eval/avg@k``) and the fraction of prompts any of them
        solved (``eval/pass@k``) — overall and per ``eval.bucket_key`` bucket."""
        if not self.eval_records:
            return {}
        ev, out = self.recipe.eval, {}
        runs = ([(None, self.sampling("greedy"))] if ev.greedy else []) + \
            ([(ev.samples, self.sampling("eval"))] if ev.samples else [])
        key = ev.bucket_key
        buckets = [f"{key}_{r.get(key)}" for r in self.eval_records] if key else None
        for k, sampling in runs:
            gen = self.generate(self.eval_records, step, n=k or 1, sampling=sampling)
            scores = self.score(gen, self.eval_records, step)
            out |= eval_rates(k, gen["prompt_index"], scores.rewards, buckets)
        self.history["eval"].append({"step": step, **out})
        self.logger.log(step, out)
        return out

    def rollout_metrics(self, gen: dict, sig, batch: list[dict]) -> dict:
        scores = gen["scores"]
        lens = gen["lengths"]
        m = {"reward/mean": sig.reward_mean, "reward/pass_rate": sig.pass_rate,
             "prompts/zero_success_frac": sig.zero_success_frac,
             "prompts/zero_variance_frac": sig.zero_variance_frac,
             "response/length_mean": sum(lens) / max(len(lens), 1),
             "response/length_max": float(max(lens, default=0)),
             "response/truncated_frac": sum(gen["truncated"]) / max(len(lens), 1),
             "reward/unscored": float(sig.unscored),
             "rollout/weight_version": float(gen["weight_version"])}
        key = self.recipe.eval.bucket_key  # pass rates per bucket, e.g. per prompt family
        if key:
            rates = eval_rates(self.recipe.sampling.n, gen["prompt_index"], scores.rewards,
                               [f"{key}_{r.get(key)}" for r in batch])
            m |= {"train/" + k.split("/", 1)[1]: v for k, v in rates.items() if k.count("/") > 1}
        for name, vals in scores.per_verifier.items():
            got = [v for v in vals if v is not None]
            m[f"reward/{name}"] = sum(got) / max(len(got), 1)
        for name, count in scores.failures.items():
            m[f"reward/failures/{name}"] = float(count)
        agent = agent_metrics(gen.get("agent"))
        if agent:  # multi-turn: kept for the summary
            self.history.setdefault("agent", []).append(agent)
        m |= agent
        self.history["reward"].append(sig.reward_mean)
        return m

    def log(self, step: int, ops: list, metrics: dict, timer: Timings) -> dict:
        metrics |= {f"time/{k}": v for k, v in timer.seconds.items()}
        metrics |= self.schedule.metrics() | self.demos.metrics() | self.rollouts.metrics()
        metrics |= {"weight_version": float(self.version)}
        metrics |= {f"restarts/{role}": float(n) for role, n in self.restarts.items()}
        if self.lost_remade:
            metrics["restarts/lost_rollouts"] = float(self.lost_remade)
        self.logger.log(step, metrics)
        if Checkpoint() in ops:  # a resume starts after this step: its metrics are stored
            self.logger.flush()
        if step % self.recipe.logging.console_every == 0 or "eval/accuracy" in metrics:
            kinds = "+".join(type(o).__name__.replace("Update", "").lower()
                             for o in ops if isinstance(o, UPDATES)) or "-"
            self.logger.console(step, self.recipe.steps, kinds, metrics)
        return metrics

    def stop(self, step: int) -> dict:
        """After SIGTERM/SIGINT: checkpoint the last finished step (unless it has one, or
        nothing was trained since the run started or resumed) and say where it is."""
        if step > self.start_step and self.saved_step != step:
            checkpoint.save(self, step)
        try:
            ckpt = str(checkpoint.find(self.run_dir, None))
        except Exception:
            ckpt = "none"
        self.logger.log(step, {"stopped": 1.0})
        print(f"braid: stopped by {STOP.requested} after step {step}/{self.recipe.steps}; "
              f"checkpoint: {ckpt}", flush=True)
        return {"stopped": STOP.requested, "step": step, "checkpoint": ckpt}

    def save_policy(self, name: str) -> Path:
        """A Hugging Face folder of the policy (transformers and vLLM load it; LoRA adapters
        merged in) and, with ``model.lora``, the adapters as a peft folder beside it
        (``<name>-adapter``)."""
        path = self._write(name, "save_hf")
        if self.recipe.model.lora is not None:
            self._write(name + "-adapter", "save_adapter")
        return path

    def _write(self, name: str, method: str) -> Path:
        path = self.run_dir / "checkpoints" / name
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.learner.call(self.learner.fanout(method, str(tmp.resolve())), method)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        return path

    def finish(self) -> dict:
        final = self.evaluate(self.recipe.steps)
        policy = self.save_policy("final")
        evals = self.history["eval"]
        summary = {"name": self.recipe.name, "steps": self.recipe.steps, "policy": str(policy),
                   "eval": evals, "reward_curve": self.history["reward"],
                   "demos": self.demos.metrics(), "schedule": self.schedule.metrics(),
                   "restarts": self.restarts,
                   "mlflow": {"uri": self.logger.uri, "run_id": self.logger.run_id}}
        if self.history.get("agent"):  # the last step's trajectories: turns, tools, statuses
            summary["agent"] = self.history["agent"][-1]
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print_summary(summary)
        self.logger.finish(summary)
        return summary | {"final": final}

    # --- set-up and tear-down --------------------------------------------------------------
    def setup(self) -> Controller:
        """Start and set up every worker. A set-up that fails releases what it made (actors,
        placement groups; the mlflow run ends FAILED, or KILLED when interrupted) and raises."""
        from orchestrator.setup import setup_controller

        try:
            setup_controller(self)
        except BaseException as err:
            try:
                self.shutdown("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            except Exception as also:  # the set-up's error is the one to raise
                print(f"braid: warning: releasing a failed set-up: {also!r}", flush=True)
            raise
        return self

    def shutdown(self, status: str = "FINISHED") -> None:
        for g in self.groups.values():
            g.shutdown()
        self.groups.clear()
        if getattr(self, "logger", None) is not None and self.logger.mlflow is not None:
            self.logger.finish({"status": status}, status)


@dataclass(frozen=True)
class Shard:
    """One engine's part of a generation: what it was asked (to ask it again, should Ray lose
    the result) and the refs of its summary and rollouts."""

    role: str
    rank: int
    items: list[dict]
    n: int
    sampling: dict
    offset: int
    summary: Any
    rollouts: Any


def agent_metrics(counts: dict | None) -> dict:
    """Multi-turn metrics of a generation: turns, tool calls and errors per trajectory, and
    the fraction of trajectories by status."""
    if not counts:
        return {}
    n = max(counts.get("samples", 0.0), 1.0)
    out = {}
    for k, v in counts.items():
        if k.startswith("status_"):
            out[f"agent/{k[len('status_'):]}_frac"] = v / n
        elif k != "samples":
            out[f"agent/{k}_per_traj"] = v / n
    calls, malformed = counts.get("tool_calls", 0.0), counts.get("malformed_tool_calls", 0.0)
    if calls + malformed:  # calls run as asked, of all the calls the policy tried
        out["agent/valid_tool_call_rate"] = \
            (calls - counts.get("invalid_tool_calls", 0.0)) / (calls + malformed)
    return out


def merge_summaries(summaries: list[dict]) -> dict:
    """One generation's summary from its engines' summaries (in shard order)."""
    merged = {k: [x for sm in summaries for x in sm[k]]
              for k in ("prompt_index", "lengths", "truncated", "texts")}
    # the oldest weights any sample came from (engines updated while generating — an
    # asynchronous engine — may differ)
    merged["weight_version"] = min(sm["weight_version"] for sm in summaries)
    merged["spanning"] = sum(sm.get("spanning", 0) for sm in summaries)
    if any("agent" in sm for sm in summaries):  # multi-turn: counts over the trajectories
        merged["agent"] = {}
        for sm in summaries:
            for k, v in sm.get("agent", {}).items():
                merged["agent"][k] = merged["agent"].get(k, 0.0) + v
        merged["masks"] = [m for sm in summaries for m in sm.get("masks", [])]
        merged["keys"] = [k for sm in summaries for k in sm.get("keys", [])]
    return merged


def groups_with_signal(gen: dict, drop_unscored: bool) -> list[int]:
    """Prompts whose samples' rewards differ (an unscored sample counts as 0, or not at all
    under ``scoring.unscored: drop``), and prompts with one sample (verl keeps those)."""
    rewards: dict[int, list] = {}
    samples: dict[int, int] = {}
    for p, r in zip(gen["prompt_index"], gen["scores"].rewards):
        samples[p] = samples.get(p, 0) + 1
        rewards.setdefault(p, [])
        if not (drop_unscored and r is None):
            rewards[p].append(r or 0.0)
    return sorted(p for p, rs in rewards.items()
                  if len(set(rs)) > 1 or (samples[p] == 1 and rs))


def print_summary(summary: dict) -> None:
    evals = summary["eval"]
    print("\n=== braid run summary: " + summary["name"] + " ===")
    if evals:
        shown = evals if len(evals) <= 5 else [evals[0], *evals[-4:]]
        keys = [k for k in shown[-1] if k.startswith("eval/")]
        print("held-out" + " " * 18 + "".join(f"   step {e['step']:>5}" for e in shown))
        for metric in dict.fromkeys(k.split("/")[1] for k in keys):
            title = "accuracy (greedy)" if metric == "accuracy" else metric
            for k in (k for k in keys if k.split("/")[1] == metric):
                label = title if k.count("/") == 1 else "  " + k.rsplit("/", 1)[1]
                print(f"  {label:<24}" + "".join(f"{e.get(k, float('nan')):>13.3f}"
                                                 for e in shown))
    curve = summary["reward_curve"]
    if curve:
        print(f"reward curve ({len(curve)} RL steps, {min(curve):.2f}..{max(curve):.2f}): "
              f"{sparkline(curve)}")
    print(f"policy: {summary['policy']}")
    print(f"mlflow: {summary['mlflow']['uri']} (run {summary['mlflow']['run_id']})", flush=True)
