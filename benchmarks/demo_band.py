"""What `make demo` prints, as a band over seeds: the demo (SFT warm-up, then GRPO) and its
SFT-only control (the GRPO phase replaced by as many more SFT steps), each seed in turn.

    .venv/bin/python benchmarks/demo_band.py [--seeds 0 1 2 3 4] [--arms demo control]
                                             [--out runs/demo_band] [override ...]

A seed sets the run's seed and the tiny model's initialisation (``seed=S model.build.seed=S``);
the training stream and the 200 held-out problems are the recipe's own, the same for every
seed. Each run is a separate `braid run` of recipes/arith_grpo_cpu.yaml (overrides apply to
both arms). Prints, per seed, held-out greedy accuracy at the start, at the end of the SFT
warm-up and at the end, for both arms and GRPO's gain over each; then each column's mean and
min-max — the band docs/benchmarks.md and the README quote — and the wall time of each run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "arith_grpo_cpu.yaml"
ARMS = {"demo": [], "control": ["schedule.args.phases.1.policy=sft"]}


def run(arm: str, seed: int, out: Path, overrides: list[str]) -> dict:
    run_dir = out / f"{arm}-s{seed}"
    log = out / f"{arm}-s{seed}.log"
    t0 = time.monotonic()
    with log.open("w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "run", str(RECIPE), f"run_dir={run_dir}",
             f"name=demo-band-{arm}-s{seed}", f"seed={seed}", f"model.build.seed={seed}",
             f"logging.mlflow_uri=sqlite:///{out / 'mlflow.db'}", *ARMS[arm], *overrides],
            cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ,
                                                                   PYTHONPATH=str(ROOT)))
    if proc.returncode:
        raise SystemExit(f"{arm} seed {seed} failed (exit {proc.returncode}); see {log}")
    evals = json.loads((run_dir / "summary.json").read_text())["eval"]
    return {"acc": [e["eval/accuracy"] for e in evals], "steps": [e["step"] for e in evals],
            "wall_s": time.monotonic() - t0}


def band(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "demo_band")
    p.add_argument("overrides", nargs="*", help="recipe overrides for both arms")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    rows: dict[int, dict] = {}
    for seed in a.seeds:
        for arm in a.arms:
            r = rows.setdefault(seed, {})[arm] = run(arm, seed, a.out, a.overrides)
            print(f"seed {seed} {arm}: accuracy {' -> '.join(f'{x:.3f}' for x in r['acc'])} "
                  f"at steps {r['steps']} ({r['wall_s']:.0f} s)", flush=True)
    both = [s for s in a.seeds if set(rows[s]) == {"demo", "control"}]
    print(f"\n{RECIPE.relative_to(ROOT)} {' '.join(a.overrides)}".rstrip())
    print("| seed | step 0 | end of SFT warm-up | + GRPO (demo) | + SFT (control) | "
          "GRPO - warm-up | GRPO - control | wall demo / control (s) |")
    print("|---|---|---|---|---|---|---|---|")
    cols: dict[str, list[float]] = {}
    for s in both:
        d, c = rows[s]["demo"], rows[s]["control"]
        vals = {"start": d["acc"][0], "warm": d["acc"][-2], "demo": d["acc"][-1],
                "control": c["acc"][-1], "gain": d["acc"][-1] - d["acc"][-2],
                "edge": d["acc"][-1] - c["acc"][-1]}
        for k, v in vals.items():
            cols.setdefault(k, []).append(v)
        print(f"| {s} | " + " | ".join(f"{v:+.3f}" if k in ("gain", "edge") else f"{v:.3f}"
                                       for k, v in vals.items())
              + f" | {d['wall_s']:.0f} / {c['wall_s']:.0f} |")
    if both:
        print(f"| mean (min-max) of {len(both)} | " + " | ".join(band(v) for v in cols.values())
              + " | |")
        print(f"\nGRPO above the warm-up on {sum(g > 0 for g in cols['gain'])} of {len(both)} "
              f"seeds, above the SFT-only control on {sum(e > 0 for e in cols['edge'])}")


if __name__ == "__main__":
    main()
