"""Chaos: the demo recipe under every fault Ray reports — SIGKILLed actors, an actor killed by
Ray's own memory monitor, a node lost with rollouts nobody fetched yet — against undisturbed runs
of the same recipe.

    .venv/bin/python benchmarks/chaos.py [--seeds 0 1 2] [--kills 6] [--chaos-seed 0]
                                         [--oom-step 420] [--node-step 460]

Every run is the demo (recipes/arith_grpo_cpu.yaml: SFT steps, then GRPO steps) shaped so that
each fault can happen: two engines, spread over nodes, generating one step ahead
(``rollout.max_staleness: 1``, so a step's rollouts wait in the object store while the
previous step learns), and the reward worker tests/fixtures/hog.py:HogReward in its ``trigger``
mode (the rule verifier's scores, until the benchmark drops a file ``oom`` in its folder).
Runs alternate: the undisturbed shape at each seed on a private local cluster, and once, at the
first seed, the same run under chaos on a two-node ``ray start`` cluster (the head with 3 CPUs,
a second node with 1 holding one engine; the head's memory monitor looks every 100 ms with its
threshold 10 GB above what this machine used when it started). The chaos run checkpoints every
50 steps with ``failures.auto_resume: 1``, ``failures.actor_restarts: 20`` and
``weight_sync.timeout_s: 30``. Faults, one at a time, all from this script:

- ``--kills`` SIGKILLs of rollout and reward actor processes at random times over 80% of the
  undisturbed run's wall time, and one SIGKILL of a random learner rank (30-60% of it);
- at the first step line >= ``--oom-step`` (a GRPO step): the reward actor is SIGKILLed so that
  its replacement is the head's newest actor (Ray 2.60's monitor kills the newest first), then
  the file is dropped and the replacement allocates in its next ``score`` until Ray's memory
  monitor kills it;
- at the first step line >= ``--node-step``: the driver is paused (SIGSTOP), the second node's
  raylet is SIGKILLed, and once the GCS counts the node dead the driver goes on — its engine
  is gone, and with it the rollouts it made for the next step.

Reported: steps lost (RL steps missing from the chaos run's reward curve: must be 0), steps
whose training reward differs from the undisturbed run of the same seed, steps run twice
(between the learner's last checkpoint and its kill), the restarts per role, what braid said
of the OOM kill and of the lost rollouts, wall time against the undisturbed run of the same
seed (ratio), and held-out greedy accuracy against the undisturbed seeds' spread.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.integration.ray_nodes import two_nodes  # noqa: E402

RECIPE = ROOT / "recipes" / "arith_grpo_cpu.yaml"
SHAPE = ["roles.rollout.replicas=2", "roles.rollout.strategy=SPREAD", "rollout.max_staleness=1",
         "roles.reward.cls=tests.fixtures.hog:HogReward", "roles.reward.env.BRAID_HOG=trigger"]
# the survivors of a sync an engine died in give up after weight_sync.timeout_s (300 s by
# default, for large models): the demo's sync takes well under a second
CHAOS = ["checkpoint.every=50", "failures.auto_resume=1", "failures.actor_restarts=20",
         "weight_sync.timeout_s=30"]
VICTIMS = {"rollout": "VLLMRollout", "reward": "HogReward"}
LEARNER = "DeepSpeedLearner"
EXTRA: list[str] = []  # --set: last, over the shape's and the chaos run's
# the head's memory monitor (tests/integration/test_ray_failures.py): its threshold ROOM_GB
# above what the machine uses when the cluster starts — the run (two engines, two learner ranks,
# a reward actor, a driver, two raylets: ~7 GB) stays under it, the hog crosses it
ROOM_GB = 10.0
MONITOR = {"RAY_min_memory_free_bytes": "-1", "RAY_memory_monitor_refresh_ms": "100",
           "RAY_max_kill_memory_buffer_bytes": "0"}
STEP = re.compile(r"step\s+(\d+)/")


def descendants(pids: list[int]) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    out, todo = [], list(pids)
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def actors(roots: list[int], cls: str) -> list[int]:
    """PIDs of actor processes of class ``cls`` under ``roots`` (Ray titles them
    ``ray::Cls...``)."""
    pids = []
    for pid in descendants(roots):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        if title.startswith(f"ray::{cls}"):
            pids.append(pid)
    return pids


def wait_for(what: str, check, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"chaos: {what} did not happen within {timeout_s:.0f}s")
        time.sleep(0.2)


class Chaos:
    """The faults of one chaos run, sent one at a time from a thread of their own."""

    def __init__(self, proc, lines, cluster, hog: Path, rng: random.Random, span_s: float,
                 kills: int, oom_step: int, node_step: int):
        self.proc, self.lines, self.hog, self.rng = proc, lines, hog, rng
        (self.address, self.nodes, self.raylet) = cluster
        times = sorted(rng.uniform(0, span_s) for _ in range(kills))
        self.timed = [(t, rng.choice(sorted(VICTIMS))) for t in times] + [
            (rng.uniform(0.3, 0.6) * span_s, "learner")]
        self.timed.sort()
        self.stepped = [(oom_step, "oom"), (node_step, "node")]
        self.log: list[dict] = []

    @property
    def roots(self) -> list[int]:
        return [p.pid for p in self.nodes.procs.values()]

    def step(self) -> int:
        return next((int(m.group(1)) for m in map(STEP.match, reversed(self.lines)) if m), 0)

    def __call__(self, begin: float, t0: float) -> None:
        while (self.timed or self.stepped) and self.proc.poll() is None:
            if self.stepped and self.step() >= self.stepped[0][0]:
                what = self.stepped.pop(0)[1]
            elif self.timed and time.time() >= begin + self.timed[0][0]:
                what = self.timed.pop(0)[1]
            else:
                time.sleep(0.2)
                continue
            entry = {"t": round(time.time() - t0, 1), "fault": what, "after_step": self.step()}
            entry |= getattr(self, f"_{what}", self._kill)(what) or {}
            self.log.append(entry)

    def _kill(self, role: str) -> dict:
        pids = actors(self.roots, LEARNER if role == "learner" else VICTIMS[role])
        if not pids:
            return {"pid": None}
        pid = self.rng.choice(pids)
        os.kill(pid, signal.SIGKILL)
        return {"pid": pid}

    def _oom(self, _) -> dict:
        old = set(actors(self.roots, VICTIMS["reward"]))
        for pid in old:
            os.kill(pid, signal.SIGKILL)
        wait_for("a replacement reward actor", lambda: set(actors(
            self.roots, VICTIMS["reward"])) - old, 300)
        (self.hog / "oom").touch()
        wait_for("the replacement's hog starting", lambda: not (self.hog / "oom").exists(), 300)
        pid = int(next(self.hog.glob("hogged-*")).name.split("-")[1])
        wait_for(f"Ray's memory monitor killing the hog (PID {pid})",
                 lambda: not psutil.pid_exists(pid), 300)
        return {"pid": pid, "sigkilled_first": sorted(old)}

    def _node(self, _) -> dict:
        os.kill(self.proc.pid, signal.SIGSTOP)
        try:
            raylet = self.raylet()
            os.kill(raylet, signal.SIGKILL)
            self.nodes.wait(self.address, alive=1, up=("head",))
        finally:
            os.kill(self.proc.pid, signal.SIGCONT)
        return {"pid": raylet}


def run(run_dir: Path, seed: int, chaos: dict | None = None) -> dict:
    """One run of the benchmark's shape of the demo; under ``chaos`` (the Chaos arguments and the
    two-node cluster), its faults are sent while it trains. Returns its summary, wall time and
    fault log."""
    hog = run_dir.parent / f"{run_dir.name}-hog"
    hog.mkdir(parents=True, exist_ok=True)
    overrides = [f"run_dir={run_dir}", f"seed={seed}", "logging.console_every=1", *SHAPE,
                 f"roles.reward.env.BRAID_HOG_DIR={hog}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if chaos:
        overrides += CHAOS + [f"ray.address={chaos['cluster'][0]}"]
        env = dict(chaos["cluster"][1].env, PYTHONPATH=str(ROOT))
    overrides += EXTRA
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(RECIPE),
                             *overrides], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    started = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if STEP.match(line):
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    faults = None
    if chaos:
        faults = Chaos(proc, lines, chaos["cluster"], hog, **chaos["args"])
        started.wait(600)
        faults(time.time(), t0)
    proc.wait()
    reader.join(timeout=10)
    text = "".join(lines)
    (run_dir.parent / f"{run_dir.name}.log").write_text(text)
    if proc.returncode:
        raise SystemExit(f"braid run failed ({run_dir}):\n{text[-5000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    resumed = [int(m) for m in re.findall(r"resumed from \S+ at step (\d+)", text)]
    return summary | {"wall_s": time.time() - t0, "faults": faults.log if faults else [],
                      "resumed_at": resumed, "log": text}


def regenerated_steps(summary: dict) -> list[int]:
    """Steps at which the run's ``rollout/regenerated_total`` went up (from its mlflow run)."""
    import mlflow

    client = mlflow.MlflowClient(summary["mlflow"]["uri"])
    hist = sorted(client.get_metric_history(summary["mlflow"]["run_id"],
                                            "rollout/regenerated_total"),
                  key=lambda m: (m.timestamp, m.step))
    out, last = [], 0.0
    for m in hist:
        if m.value > last:
            out.append(m.step)
        last = m.value
    return out


def said(log: str, pattern: str) -> str:
    m = re.search(pattern, log)
    return m.group(0).strip() if m else "(nothing said)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--kills", type=int, default=6, help="rollout and reward SIGKILLs")
    ap.add_argument("--chaos-seed", type=int, default=0, help="seeds the kill times and victims")
    ap.add_argument("--oom-step", type=int, default=420)
    ap.add_argument("--node-step", type=int, default=460)
    ap.add_argument("--out", default="runs/chaos")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more recipe overrides for every run (e.g. a shorter one)")
    args = ap.parse_args()
    EXTRA.extend(args.set)
    out = ROOT / args.out
    base: dict[int, dict] = {}
    chaos = None
    for i, seed in enumerate(args.seeds):  # undisturbed, chaos, undisturbed, ...
        base[seed] = run(out / f"base-{seed}", seed)
        print(f"undisturbed seed {seed}: {base[seed]['wall_s']:.0f}s, accuracy "
              f"{base[seed]['eval'][-1]['eval/accuracy']:.3f}", flush=True)
        if i == 0:
            mem = psutil.virtual_memory()
            threshold = (mem.total - mem.available + ROOM_GB * 2**30) / mem.total
            if threshold > 0.9:
                raise SystemExit(f"chaos: too little free memory for the OOM fault: {mem}")
            head_env = MONITOR | {"RAY_memory_usage_threshold": f"{threshold:.4f}"}
            with two_nodes(head_cpus=3, second_cpus=1, head_env=head_env,
                           system_config={"max_direct_call_object_size": 1024}) as cluster:
                chaos = run(out / f"chaos-{seed}", seed, {
                    "cluster": cluster, "args": {
                        "rng": random.Random(args.chaos_seed), "kills": args.kills,
                        "span_s": 0.8 * base[seed]["wall_s"], "oom_step": args.oom_step,
                        "node_step": args.node_step}})
            print(f"chaos seed {seed}: {chaos['wall_s']:.0f}s (memory threshold "
                  f"{threshold:.3f} of {mem.total / 2**30:.1f} GiB)", flush=True)
    report(args, base, chaos, out)


def report(args, base: dict, chaos: dict, out: Path) -> None:
    seed = args.seeds[0]
    ref, got = base[seed]["reward_curve"], chaos["reward_curve"]
    differ = [i + 1 for i, (a, b) in enumerate(zip(ref, got)) if a != b]
    accs = [b["eval"][-1]["eval/accuracy"] for b in base.values()]
    acc = chaos["eval"][-1]["eval/accuracy"]
    last_ckpt = max(chaos["resumed_at"], default=None)
    learner = next((k for k in chaos["faults"] if k["fault"] == "learner"), None)
    rerun = (learner["after_step"] - last_ckpt
             if learner and learner.get("pid") and last_ckpt is not None else 0)
    print("\n=== chaos: recipes/arith_grpo_cpu.yaml (2 engines, max_staleness 1), seed", seed,
          "===")
    for k in chaos["faults"]:
        what = {"oom": "reward   OOM (monitor)", "node": "node     raylet SIGKILL"}.get(
            k["fault"], f"{k['fault']:<8} SIGKILL")
        print(f"  {k['t']:>6.1f}s: {what:<23} pid {k['pid']}"
              + (f" (after step {k['after_step']})" if k.get("pid") else " (none running)"))
    print(f"RL steps: {len(got)} of {len(ref)}; steps lost: {len(ref) - len(got)}; RL steps "
          f"whose reward differs from the undisturbed run: {len(differ)} {differ or ''}")
    print(f"learner: resumed from step(s) {chaos['resumed_at'] or 'none'}; steps run twice: "
          f"{rerun}")
    print(f"restarts: {chaos['restarts']}")
    oom = said(chaos["log"], r"braid: reward rank \d+ failed \(reward actor killed by Ray's "
                             r"memory monitor[^\n]*")
    lost = said(chaos["log"], r"Ray lost the rollouts of[^\n]*")
    if lost == "(nothing said)":  # the engine died before it answered: regenerated as such
        lost = "none returned and then lost (rollouts lost with a dead engine are regenerated: " \
               "below)"
    print(f"OOM: {oom}\nlost objects: {lost}")
    remade = regenerated_steps(chaos)
    print(f"steps whose rollouts were generated again (an engine lost with them in flight: "
          f"remade under newer weights, so their rewards may differ): {remade}")
    notes = [line.strip() for line in chaos["log"].splitlines()
             if line.startswith("braid:") or "Ray lost" in line or "resumed from" in line]
    print("what braid said (log: " + str(out / f"chaos-{seed}.log") + "):\n  " +
          "\n  ".join(notes[:40]))
    print(f"wall time: {chaos['wall_s']:.0f}s against {base[seed]['wall_s']:.0f}s undisturbed "
          f"(ratio {chaos['wall_s'] / base[seed]['wall_s']:.2f})")
    print(f"held-out accuracy: {acc:.3f} under chaos; undisturbed seeds {args.seeds}: "
          + ", ".join(f"{a:.3f}" for a in accs)
          + f" (mean {statistics.mean(accs):.3f}); within the seeds' range: "
          f"{min(accs) <= acc <= max(accs)}; same seed undisturbed: "
          f"{base[seed]['eval'][-1]['eval/accuracy']:.3f}")
    (out / "chaos.json").write_text(json.dumps(
        {"faults": chaos["faults"], "restarts": chaos["restarts"],
         "steps_lost": len(ref) - len(got), "steps_differ": differ, "rerun": rerun,
         "oom": oom, "lost_objects": lost, "regenerated_steps": remade, "wall_s": chaos["wall_s"],
         "base_wall_s": {s: b["wall_s"] for s, b in base.items()}, "accuracy": acc,
         "base_accuracy": dict(zip(base, accs))}, indent=2))


if __name__ == "__main__":
    main()
