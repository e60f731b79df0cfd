"""What a run does when a cluster does what clusters do.

- **A rollout, reward, reference or teacher actor dies** (a node lost, an OOM kill, a segfault in
  an engine): the controller method that saw it is marked ``@recoverable``; the dead actors are
  replaced in their placement bundles and set up again, a new rollout engine rejoins the
  weight-sync group (the group is formed anew: a gloo or NCCL group cannot take a member back)
  and every engine receives the learner's current weights; then the method runs again. Each role
  gets ``failures.actor_restarts`` replacements per run (``max_restarts`` all together); the
  count survives resumes in ``<run_dir>/restarts.json``.
- **An actor hangs** (alive, never answering): a call past its deadline (``failures.deadline``,
  orchestrator/groups.py) kills it, and it is handled as a dead one.
- **A learner rank dies**: its ZeRO-3 partitions and optimizer state are gone, so there is
  nothing to rejoin. The run stops with :class:`LearnerLost`, naming the checkpoint to resume
  from; with ``failures.auto_resume`` the CLI brings the run back up from it.
- **SIGTERM or SIGINT** (``ray job stop``, Ctrl-C) to ``braid run``: the current step finishes,
  a checkpoint is written, the process exits 143 (130 for SIGINT); a signal during set-up stops
  the run before its first step. A second signal exits at once.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from pathlib import Path

from orchestrator.groups import WorkerError

RESTARTABLE = ("rollout", "reward", "reference", "teacher")
# a dead rank of these takes its ZeRO-3 partitions with it: the run resumes from a checkpoint
ZERO_GROUPS = ("learner", "critic")


class LearnerLost(WorkerError):
    """A learner (or critic) rank died; ``checkpoint`` is the newest complete checkpoint (or
    None); ``oom``: Ray's memory monitor killed it."""

    def __init__(self, message: str, checkpoint: Path | None, role: str = "learner",
                 oom: bool = False):
        super().__init__(message, role, died=True)
        self.checkpoint, self.oom = checkpoint, oom


def recoverable(method):
    """Run a controller method again after replacing the actors whose death made it fail, or
    after making again the rollouts Ray lost (those of a generation among its arguments; a
    method that generates makes them anew by running again) — at most ``LOST_RETRIES`` times
    in a row for lost objects."""

    @functools.wraps(method)
    def wrapper(c, *args, **kwargs):
        lost = 0
        gens = [a for a in (*args, *kwargs.values()) if isinstance(a, dict) and "shards" in a]
        while True:
            try:
                if lost:  # here, so that a failure while remaking is handled like any other
                    for gen in gens:
                        c.remake_lost(gen)
                return method(c, *args, **kwargs)
            except WorkerError as err:
                if isinstance(err, LearnerLost):
                    raise
                if err.lost and lost < LOST_RETRIES:
                    lost += 1
                    replace_dead(c, err)
                elif not replace_dead(c, err):
                    raise

    return wrapper


LOST_RETRIES = 3


def gone(group, err: WorkerError) -> list[int]:
    """Ranks of ``group`` that are dead, or that braid killed as hung for ``err`` (Ray may not
    report those dead yet)."""
    killed = err.killed if err.role == group.role else []
    return sorted(set(group.dead()) | set(killed))


def replace_dead(c, err: WorkerError) -> bool:
    """Replace every dead restartable actor; False when none is dead (the error stands)."""
    dead = {role: gone(g, err) for role, g in c.groups.items()}
    for role in ZERO_GROUPS:
        if dead.get(role):
            raise learner_lost(c, dead[role], err, role) from err
    dead = {role: ranks for role, ranks in dead.items() if ranks and role in RESTARTABLE}
    if not dead:
        return False
    restart(c, dead, err)
    if "rollout" in dead:
        from orchestrator.setup import init_weight_sync

        init_weight_sync(c)
        c.sync_weights(resend=True)
    return True


# the settings that lower each role's memory, named when Ray's memory monitor kills it twice
LOWER_MEMORY = {
    "rollout": "roles.rollout.args.cpu_kv_cache_gb (the engine's KV cache on CPU) or "
               "gpu_memory_utilization, or a smaller max_model_len",
    "teacher": "roles.teacher.args.cpu_kv_cache_gb or gpu_memory_utilization, or a smaller "
               "max_model_len",
    "reward": "what the verifiers hold (a sandbox's memory limit, a reward model's batch), or "
              "more roles.reward.replicas so that each scores fewer samples",
    "reference": "roles.reference.args.micro_batch_size or max_tokens_per_micro_batch",
    "learner": "algorithm.micro_batch_size, or more roles.learner.replicas (ZeRO-3 splits "
               "the model and optimizer state over them)",
    "critic": "algorithm.micro_batch_size, or more roles.critic.replicas",
}


def oom_again(c, dead: dict[str, list[int]], err: WorkerError) -> None:
    """Ray's memory monitor killed these actors: the first time a role is replaced like any
    dead actor; a role killed so again after its replacement stops the run, naming what its
    actors used and the setting that lowers it (the node cannot hold the role as set)."""
    for role, ranks in dead.items():
        group = c.groups[role]
        killed = getattr(group, "oom_killed", {})
        if not (err.oom or any(killed.get(r) for r in ranks)):
            continue
        ids = {group.actors[r]._actor_id.hex(): r for r in ranks} if err.memory else {}
        used = {r: err.memory[a] for a, r in ids.items() if a in err.memory}
        # killed by the monitor: in its report, or its own death says so
        if not (used or any(killed.get(r) for r in ranks) or role == err.role):
            continue
        if c.oom_kills.get(role):
            measured = ", ".join(f"rank {r} {gb:.2f} GB" for r, gb in sorted(used.items()))
            raise WorkerError(
                f"{err} — {role} actors were killed by Ray's memory monitor again after their "
                f"replacement (using {measured or 'what Ray did not report'} when killed): "
                f"this node cannot hold the role as set. Lower it with "
                f"{LOWER_MEMORY.get(role, f'roles.{role}.args')}, or run on nodes with more "
                "memory", role) from err
        c.oom_kills[role] = c.oom_kills.get(role, 0) + 1


def restart(c, dead: dict[str, list[int]], err: WorkerError) -> None:
    """Replace (and set up) the ``dead`` ranks of restartable roles, within the run's budgets;
    a replacement that dies while it sets up is replaced in turn (and counted)."""
    check_budget(c, {role: len(ranks) for role, ranks in dead.items()}, err)
    oom_again(c, dead, err)
    for role, ranks in dead.items():
        for rank in ranks:
            while True:
                print(f"braid: {role} rank {rank} failed ({err}); starting a replacement",
                      flush=True)
                count_restart(c, role)
                try:
                    c.groups[role].restart(rank)
                    break
                except WorkerError as again:
                    if not again.died:
                        raise
                    err = again
                    check_budget(c, {role: 1}, err)
                    oom_again(c, {role: [rank]}, err)


def check_budget(c, more: dict[str, int], err: WorkerError) -> None:
    """Refuse ``more`` replacements (role -> count) past the run's budgets: per role
    (``failures.actor_restarts``) and in all (``failures.max_restarts``)."""
    f = c.recipe.failures
    for role, n in more.items():
        if c.restarts.get(role, 0) + n > f.actor_restarts:
            raise WorkerError(f"{err} — {role} actors failed {c.restarts.get(role, 0) + n} "
                              f"times in this run, more than failures.actor_restarts="
                              f"{f.actor_restarts}", role, died=True) from err
    done = sum(n for r, n in c.restarts.items() if r in RESTARTABLE)
    if f.max_restarts is not None and done + sum(more.values()) > f.max_restarts:
        raise WorkerError(f"{err} — {done + sum(more.values())} actor failures in this run, "
                          f"more than failures.max_restarts={f.max_restarts}",
                          next(iter(more)), died=True) from err


def set_up(c, group, refs: list) -> None:
    """Wait for a group's ``setup`` calls (one per rank, in rank order); a rollout, reward,
    reference or teacher actor that dies meanwhile is replaced and set up anew. (Set-up has no
    deadline: loading a model may take long.)"""
    waiting = dict(enumerate(refs))  # rank -> its setup call
    while waiting:
        try:
            group.call(list(waiting.values()), "setup")
            return
        except WorkerError as err:
            dead = gone(group, err) if err.died and group.role in RESTARTABLE else []
            if not dead:
                raise
            restart(c, {group.role: dead}, err)
            for rank in dead:
                waiting.pop(rank, None)


def count_restart(c, role: str) -> None:
    """One more replacement (or, for a learner, a lost attempt) of ``role`` in this run, kept in
    ``<run_dir>/restarts.json`` so that budgets and metrics count resumed attempts too."""
    c.restarts[role] = c.restarts.get(role, 0) + 1
    path = c.run_dir / "restarts.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    run_id = getattr(getattr(c, "logger", None), "run_id", None)
    tmp.write_text(json.dumps({"mlflow_run_id": run_id, "restarts": c.restarts}))
    os.replace(tmp, path)


def restarts_so_far(run_dir: Path, run_id: str | None = None) -> dict[str, int]:
    """The run's replacements before this attempt (a resume continues the count); none when
    the file belongs to another run (its mlflow run id differs from ``run_id``)."""
    path = run_dir / "restarts.json"
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    return dict(saved["restarts"]) if saved.get("mlflow_run_id") == run_id else {}


def learner_lost(c, ranks: list[int], err: BaseException, role: str = "learner") -> LearnerLost:
    from orchestrator import checkpoint

    count_restart(c, role)
    try:
        ckpt = checkpoint.find(c.run_dir, None)
        where = f"resume from {ckpt}"
    except Exception:
        ckpt, where = None, "no checkpoint was written (set checkpoint.every to keep one)"
    group = c.groups.get(role)
    oom = getattr(err, "oom", False) or any(
        group is not None and group.oom_killed.get(r) for r in ranks)
    if oom and "memory monitor" not in str(err):
        err = f"{err} (Ray's memory monitor killed it)"
    return LearnerLost(f"{role} rank(s) {ranks} died: {err}; the run cannot continue without "
                       f"its ZeRO-3 partitions — {where}", ckpt, role, oom)


def explain(c, err: WorkerError) -> WorkerError:
    """A learner failure becomes LearnerLost when a rank is gone (the survivors usually
    report a broken collective first)."""
    if isinstance(err, LearnerLost):
        return err
    for role in ZERO_GROUPS:
        dead = gone(c.groups[role], err) if role in c.groups else []
        if dead:
            return learner_lost(c, dead, err, role)
    return err


class _Stop:
    """The process-wide stop request: the signal's name once SIGTERM or SIGINT arrived."""

    requested: str | None = None

    @property
    def exit_status(self) -> int:
        return 128 + signal.Signals[self.requested] if self.requested else 0


STOP = _Stop()


def install_stop_handler() -> None:
    """First SIGTERM/SIGINT: note it (the controller finishes its step, checkpoints, exits).
    Second: exit now. The CLI installs it before anything else; ``init_ray`` keeps it through
    ``ray.init``, which would otherwise replace it with its own."""

    def on_signal(signum, frame):
        name = signal.Signals(signum).name
        if STOP.requested:
            sys.exit(128 + signum)
        STOP.requested = name
        # os.write, not print: a signal can land in the middle of a print
        os.write(2, f"braid: {name}: finishing this step, then writing a checkpoint (send it "
                    "again to exit at once)\n".encode())

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
