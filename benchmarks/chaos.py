"""Chaos: the demo recipe with its actors killed from outside the driver, against undisturbed
runs of the same recipe.

    .venv/bin/python benchmarks/chaos.py [--seeds 0 1 2] [--kills 6] [--chaos-seed 0]

Runs, alternating: the undisturbed demo (recipes/arith_grpo_cpu.yaml: SFT steps, then GRPO
steps) at each seed, and once, at the first seed, the same run under chaos: ``--kills``
SIGKILLs of rollout and reward actor processes at random times while the run trains, and one
SIGKILL of a random learner rank, all sent by this script (it finds the run's actors by their
process titles, ``ray::VLLMRollout...``, among the driver's descendants). The chaos run
checkpoints every 50 steps and has ``failures.auto_resume: 1`` and ``actor_restarts: 20``; the
undisturbed runs are the recipe as shipped. Every run prints each step (``console_every=1``).

Reported: steps lost (RL steps missing from the chaos run's reward curve: must be 0), steps
whose training reward differs from the undisturbed run of the same seed (0 when every
replacement and the resume were exact), steps run twice (between the learner's last checkpoint
and its kill), the restarts per role, wall time against the undisturbed run of the same seed
(ratio), and held-out greedy accuracy against the undisturbed seeds' spread.
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

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "arith_grpo_cpu.yaml"
CHAOS = ["checkpoint.every=50", "failures.auto_resume=1", "failures.actor_restarts=20"]
VICTIMS = {"rollout": "VLLMRollout", "reward": "RuleRewardWorker"}
LEARNER = "DeepSpeedLearner"


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def actors(driver: int, cls: str) -> list[int]:
    """PIDs of the run's actor processes of class ``cls`` (Ray titles them ``ray::Cls...``)."""
    pids = []
    for pid in descendants(driver):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        if title.startswith(f"ray::{cls}"):
            pids.append(pid)
    return pids


def run(run_dir: Path, seed: int, chaos: dict | None) -> dict:
    """One run of the demo; under ``chaos`` ({"kills": n, "rng": Random, "span_s": seconds}),
    the kills are sent while it trains. Returns its summary, wall time and kill log."""
    overrides = [f"run_dir={run_dir}", f"seed={seed}", "logging.console_every=1"] + (
        CHAOS if chaos else [])
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(RECIPE),
                             *overrides], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    lines: list[str] = []
    started = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if re.match(r"step\s+\d+/", line):
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    kills: list[dict] = []
    if chaos:
        started.wait(600)
        begin = time.time()
        rng = chaos["rng"]
        times = sorted(rng.uniform(0, chaos["span_s"]) for _ in range(chaos["kills"]))
        learner_at = rng.uniform(0.3, 0.6) * chaos["span_s"]
        plan = [(t, rng.choice(sorted(VICTIMS))) for t in times] + [(learner_at, "learner")]
        for at, role in sorted(plan):
            time.sleep(max(0.0, begin + at - time.time()))
            if proc.poll() is not None:
                break
            pids = actors(proc.pid, LEARNER if role == "learner" else VICTIMS[role])
            if not pids:
                kills.append({"t": round(time.time() - t0, 1), "role": role, "pid": None})
                continue
            pid = rng.choice(pids)
            os.kill(pid, signal.SIGKILL)
            step = next((m.group(1) for m in map(re.compile(r"step\s+(\d+)/").match,
                                                 reversed(lines)) if m), "0")
            kills.append({"t": round(time.time() - t0, 1), "role": role, "pid": pid,
                          "after_step": int(step)})
    proc.wait()
    reader.join(timeout=10)
    text = "".join(lines)
    if proc.returncode:
        raise SystemExit(f"braid run failed ({run_dir}):\n{text[-5000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    resumed = [int(m) for m in re.findall(r"resumed from \S+ at step (\d+)", text)]
    return summary | {"wall_s": time.time() - t0, "kills": kills, "resumed_at": resumed,
                      "log": text}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--kills", type=int, default=6, help="rollout and reward kills")
    ap.add_argument("--chaos-seed", type=int, default=0, help="seeds the kill times and victims")
    ap.add_argument("--out", default="runs/chaos")
    args = ap.parse_args()
    out = ROOT / args.out
    base: dict[int, dict] = {}
    chaos = None
    for i, seed in enumerate(args.seeds):  # undisturbed, chaos, undisturbed, ...
        base[seed] = run(out / f"base-{seed}", seed, None)
        print(f"undisturbed seed {seed}: {base[seed]['wall_s']:.0f}s, accuracy "
              f"{base[seed]['eval'][-1]['eval/accuracy']:.3f}", flush=True)
        if i == 0:
            span = 0.8 * base[seed]["wall_s"]
            chaos = run(out / f"chaos-{seed}", seed, {"kills": args.kills, "span_s": span,
                                                     "rng": random.Random(args.chaos_seed)})
            print(f"chaos seed {seed}: {chaos['wall_s']:.0f}s", flush=True)
    seed = args.seeds[0]
    ref, got = base[seed]["reward_curve"], chaos["reward_curve"]
    differ = sum(a != b for a, b in zip(ref, got))
    accs = [b["eval"][-1]["eval/accuracy"] for b in base.values()]
    acc = chaos["eval"][-1]["eval/accuracy"]
    spread = (min(accs), max(accs))
    last_ckpt = max(chaos["resumed_at"], default=None)
    learner_kill = next((k for k in chaos["kills"] if k["role"] == "learner"), None)
    rerun = (learner_kill["after_step"] - last_ckpt
             if learner_kill and learner_kill.get("pid") and last_ckpt is not None else 0)
    print("\n=== chaos: recipes/arith_grpo_cpu.yaml, seed", seed, "===")
    for k in chaos["kills"]:
        print(f"  kill at {k['t']:>6.1f}s: {k['role']:<8} pid {k['pid']}"
              + (f" (after step {k['after_step']})" if k.get("pid") else " (none running)"))
    print(f"RL steps: {len(got)} of {len(ref)}; steps lost: {len(ref) - len(got)}; steps whose "
          f"reward differs from the undisturbed run: {differ}")
    print(f"learner: resumed from step(s) {chaos['resumed_at'] or 'none'}; steps run twice: "
          f"{rerun}")
    print(f"restarts: {chaos['restarts']}")
    print(f"wall time: {chaos['wall_s']:.0f}s against {base[seed]['wall_s']:.0f}s undisturbed "
          f"(ratio {chaos['wall_s'] / base[seed]['wall_s']:.2f})")
    print(f"held-out accuracy: {acc:.3f} under chaos; undisturbed seeds {args.seeds}: "
          + ", ".join(f"{a:.3f}" for a in accs)
          + f" (mean {statistics.mean(accs):.3f}); within the seeds' range: "
          f"{spread[0] <= acc <= spread[1]}; same seed undisturbed: "
          f"{base[seed]['eval'][-1]['eval/accuracy']:.3f}")
    (out / "chaos.json").write_text(json.dumps(
        {"kills": chaos["kills"], "restarts": chaos["restarts"], "steps_lost": len(ref) - len(got),
         "steps_differ": differ, "rerun": rerun, "wall_s": chaos["wall_s"],
         "base_wall_s": {s: b["wall_s"] for s, b in base.items()}, "accuracy": acc,
         "base_accuracy": dict(zip(base, accs))}, indent=2))


if __name__ == "__main__":
    main()
