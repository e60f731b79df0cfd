"""Peak resident memory of each role of a run, read from /proc while it runs — what the set-up's
estimate (orchestrator/memory.py) is checked against, and what docs/benchmarks.md quotes.

    .venv/bin/python benchmarks/memory.py [RECIPE] [override ...] [--every 1.0]

Runs `braid run RECIPE` (default: the demo) and samples, every ``--every`` seconds, each Ray
actor's process tree (the actor, and children such as the verifier process or a vLLM engine
core) and the driver: RSS (resident pages, shared libraries included, what `top` shows) and
USS (pages only that process holds, what freeing it would return; read every 10th sample, as
reading it costs a large process tens of milliseconds), and the CPU seconds each
role's processes used. Prints each role's peak per replica beside the estimate set-up printed,
and the node's peak in all.
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


def tree_memory(p: psutil.Process, full: bool, children: bool = True
                ) -> tuple[int, int, float]:
    """RSS, USS (with ``full``: it reads /proc/PID/smaps, which costs a large process tens of
    milliseconds; 0 otherwise) and CPU seconds (user + system) of a process and its children."""
    rss = uss = 0
    cpu = 0.0
    for q in [p, *(p.children(recursive=True) if children else [])]:
        try:
            info = q.memory_full_info() if full else q.memory_info()
            t = q.cpu_times()
            rss, cpu = rss + info.rss, cpu + t.user + t.system
            uss += getattr(info, "uss", 0)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return rss, uss, cpu


def _ppid(p: psutil.Process) -> int | None:
    try:
        return p.ppid()
    except psutil.NoSuchProcess:
        return None


def sample(driver: psutil.Process, peaks: dict, total: list, stop: threading.Event,
           every: float) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        full = n % 10 == 1  # USS every 10th sample: the sampler should not load the run
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
                # the driver alone: its tree is the private cluster, every actor included
                rss, uss, cpu = tree_memory(p, full, children=role != "driver")
            except psutil.NoSuchProcess:
                continue
            old = peaks.setdefault((role, pid), (0, 0, 0.0))
            peaks[(role, pid)] = (max(old[0], rss), max(old[1], uss), max(old[2], cpu))
            now += rss
        total[0] = max(total[0], now)
        stop.wait(every)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", nargs="?", default=str(ROOT / "recipes" / "arith_grpo_cpu.yaml"))
    p.add_argument("overrides", nargs="*")
    p.add_argument("--every", type=float, default=1.0)
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
    print("| role | processes | peak RSS per replica (GB) | peak USS per replica (GB) | "
          "CPU seconds, all replicas |")
    print("|---|---|---|---|---|")
    for role in dict.fromkeys(r for r, _ in peaks):
        mine = [v for (r, _), v in peaks.items() if r == role]
        print(f"| {role} | {len(mine)} | {max(v[0] for v in mine) / gb:.2f} | "
              f"{max(v[1] for v in mine) / gb:.2f} | {sum(v[2] for v in mine):.0f} |")
    print(f"| all, at once (sum of RSS, shared pages counted per process) | | "
          f"{total[0] / gb:.2f} | | |")
    for line in estimate:
        print(line)


if __name__ == "__main__":
    main()
