"""Peak resident memory of each role of a run, read from /proc while it runs — what the set-up's
estimate (orchestrator/memory.py) is checked against, and what docs/benchmarks.md quotes.

    .venv/bin/python benchmarks/memory.py [RECIPE] [override ...] [--every 0.5]

Runs `braid run RECIPE` (default: the demo) and samples, every ``--every`` seconds, each Ray
actor's process tree (the actor, and children such as the verifier process or a vLLM engine
core) and the driver: RSS (resident pages, shared libraries included, what `top` shows) and
USS (pages only that process holds, what freeing it would return). Prints each role's peak
per replica against the estimate set-up printed, and the node's peak in all.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
ROLES = {"VLLMRollout": "rollout", "AsyncVLLMRollout": "rollout", "DeepSpeedLearner": "learner",
         "RuleRewardWorker": "reward", "ReferenceWorker": "reference",
         "DeepSpeedCritic": "critic", "RewardModelWorker": "reward"}


def tree_memory(p: psutil.Process) -> tuple[int, int]:
    rss = uss = 0
    for q in [p, *p.children(recursive=True)]:
        try:
            info = q.memory_full_info()
            rss, uss = rss + info.rss, uss + info.uss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return rss, uss


def _ppid(p: psutil.Process) -> int | None:
    try:
        return p.ppid()
    except psutil.NoSuchProcess:
        return None


def sample(driver: psutil.Process, peaks: dict, total: list, stop: threading.Event,
           every: float) -> None:
    while not stop.is_set():
        now = 0
        procs = {driver.pid: ("driver", driver)}
        try:  # this run's actors: its private cluster's raylet is the driver's child
            mine = driver.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for p in mine:
            try:
                m = re.match(r"ray::(\w+)", " ".join(p.cmdline()))
                if m and m.group(1) in ROLES:
                    procs[p.pid] = (ROLES[m.group(1)], p)
            except psutil.NoSuchProcess:
                pass
        # an actor's children (a verifier process forked from it keeps its title) count in
        # its tree, not as actors of their own
        procs = {pid: v for pid, v in procs.items() if pid == driver.pid or
                 _ppid(v[1]) not in procs}
        for pid, (role, p) in procs.items():
            try:
                rss, uss = tree_memory(p) if role != "driver" else (
                    p.memory_full_info().rss, p.memory_full_info().uss)
            except psutil.NoSuchProcess:
                continue
            old = peaks.setdefault((role, pid), (0, 0))
            peaks[(role, pid)] = (max(old[0], rss), max(old[1], uss))
            now += uss
        total[0] = max(total[0], now)
        stop.wait(every)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", nargs="?", default=str(ROOT / "recipes" / "arith_grpo_cpu.yaml"))
    p.add_argument("overrides", nargs="*")
    p.add_argument("--every", type=float, default=0.5)
    a = p.parse_args()
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", a.recipe,
                             *a.overrides], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    peaks: dict = {}
    total = [0]
    stop = threading.Event()
    threading.Thread(target=sample, args=(psutil.Process(proc.pid), peaks, total, stop,
                                          a.every), daemon=True).start()
    estimate = []
    for line in proc.stdout:
        if line.startswith("braid: memory"):
            estimate.append(line.rstrip())
        if re.match(r"step\s+\d+/", line) or "accuracy" in line or "memory" in line:
            print(line, end="", flush=True)
    proc.wait()
    stop.set()
    if proc.returncode:
        raise SystemExit(f"braid run failed with exit status {proc.returncode}")
    gb = 2**30
    print(f"\n{' '.join([Path(a.recipe).name, *a.overrides])}: {time.monotonic() - t0:.0f} s")
    print("| role | replicas | peak RSS per replica (GB) | peak USS per replica (GB) |")
    print("|---|---|---|---|")
    for role in dict.fromkeys(r for r, _ in peaks):
        mine = [v for (r, _), v in peaks.items() if r == role]
        print(f"| {role} | {len(mine)} | {max(v[0] for v in mine) / gb:.2f} | "
              f"{max(v[1] for v in mine) / gb:.2f} |")
    print(f"| all, at once (sum of USS) | | | {total[0] / gb:.2f} |")
    for line in estimate:
        print(line)


if __name__ == "__main__":
    main()
