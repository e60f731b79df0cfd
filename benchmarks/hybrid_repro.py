"""Hybrid SFT/RL reproduction on the arithmetic task: arms x seeds, one table and one plot.

    make repro            # = .venv/bin/python benchmarks/hybrid_repro.py
    .venv/bin/python benchmarks/hybrid_repro.py --seeds 0 1 2 --steps 50 --arms grpo relift

Stage 1 trains a shared base policy (recipes/repro/base.yaml: SFT warm-up on 1-3 digits).
Stage 2 runs every arm from it with the same learner-step budget (``--steps``) and at most the
same rollouts per step (recipes/repro/arm.yaml), for each seed, each a real `braid run`.
ReLIFT runs first: the `sft_matched` arm then gets as many demonstrations as ReLIFT used
(mean over seeds). Evaluation: greedy accuracy on 400 fixed problems, by operand digits;
4 digits never appear in training (out of distribution).

Finished runs are kept and reused (``--fresh`` reruns them), so the harness can be stopped
and started again. Writes runs/repro/results.md (mean ± std per arm and bucket,
demonstrations used) and runs/repro/results.png (``--out`` renames both); every run logs to
mlflow at sqlite:///runs/repro/mlflow.db.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "repro"
BRAID = [sys.executable, "-m", "orchestrator.cli", "run"]
FRESH = False

ARMS: dict[str, list[str]] = {
    "grpo": ["schedule.policy=rl"],
    "sft_full": ["schedule.policy=sft"],
    "sft_matched": ["schedule.policy=sft"],  # + data.demo_budget = ReLIFT's demonstrations
    "sft_then_rl": ["schedule.policy=phases",
                    "schedule.args={phases: [{policy: sft, steps: HALF}, "
                    "{policy: rl, steps: HALF}]}"],
    "relift": ["schedule.policy=relift", "schedule.args={buffer_size: 32}"],
    # ReLIFT's code uses one learning rate for both optimizers; the SFT arms' sft_lr (3e-3)
    # applied to its rare SFT steps, each on fresh Adam moments, is a large sign-like step.
    "relift_same_lr": ["schedule.policy=relift", "schedule.args={buffer_size: 32}",
                       "algorithm.sft_lr=0.001"],
    "sasr": ["schedule.policy=sasr", "schedule.args={warmup_steps: 10}"],
    "hpt": ["schedule.policy=hpt", "schedule.args={switch_gate: 0}"],
    # ReFT (Luong et al. 2024): SFT warm-up (the base), then PPO with a value model: the
    # recipe recipes/repro/ppo.yaml (arm.yaml with a critic and GAE advantages)
    "ppo": [],
}
RECIPES = {"ppo": "recipes/repro/ppo.yaml"}  # the others: recipes/repro/arm.yaml


def braid_run(recipe: str, overrides: list[str], log: Path, run_dir: Path) -> dict:
    done = run_dir / "summary.json"
    if done.is_file() and not FRESH:  # the harness resumes: finished runs are kept
        return json.loads(done.read_text())
    t0 = time.time()
    with log.open("w") as f:
        proc = subprocess.run(BRAID + [recipe, *overrides], cwd=ROOT, stdout=f,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"braid run {recipe} {' '.join(overrides)} failed; see {log}")
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"  {run_dir.name}: {time.time() - t0:.0f}s, final accuracy "
          f"{summary['eval'][-1]['eval/accuracy']:.3f}, demos used "
          f"{summary.get('demos', {}).get('demos/used', 0):.0f}", flush=True)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description="hybrid SFT/RL reproduction")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--arms", nargs="+", default=[a for a in ARMS if a != "ppo"],
                    choices=list(ARMS), help="default: the hybrid study (ppo: --arms grpo ppo)")
    ap.add_argument("--fresh", action="store_true", help="rerun runs that already finished")
    ap.add_argument("--out", default="results",
                    help="names the table and plot: runs/repro/OUT.md, OUT.png")
    a = ap.parse_args()
    global FRESH
    FRESH = a.fresh
    RUNS.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = RUNS / "base" / "checkpoints" / "final"
    if not (base / "config.json").is_file():
        print("stage 1: base policy (SFT warm-up)", flush=True)
        braid_run("recipes/repro/base.yaml", ["name=repro-base"], RUNS / "base.log",
                  RUNS / "base")
    results: dict[str, list[dict]] = {}
    arms = sorted(a.arms, key=lambda x: x != "relift")  # ReLIFT first: it sets the SFT budget
    for arm in arms:
        print(f"arm {arm}", flush=True)
        over = [o.replace("HALF", str(a.steps // 2)) for o in ARMS[arm]]
        if arm == "sft_matched":
            used = [s["demos"]["demos/used"] for s in results.get("relift", [])]
            if not used:
                sys.exit("sft_matched needs the relift arm in the same run")
            over.append(f"data.demo_budget={round(statistics.mean(used))}")
        for seed in a.seeds:
            name = f"repro-{arm}-s{seed}"
            results.setdefault(arm, []).append(braid_run(
                RECIPES.get(arm, "recipes/repro/arm.yaml"), [f"name={name}", f"seed={seed}",
                                           f"steps={a.steps}", *over],
                RUNS / f"{name}.log", RUNS / name))
    table = write_table(results, a, time.time() - t0)
    print(table)
    plot(results, a.out)


def _bucket_keys(results) -> list[str]:
    last = next(iter(results.values()))[0]["eval"][-1]
    return ["eval/accuracy"] + sorted(k for k in last if k.startswith("eval/accuracy/"))


def _ms(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


def write_table(results, a, seconds: float) -> str:
    keys = _bucket_keys(results)
    base = next(iter(results.values()))[0]["eval"][0]
    names = ["overall" if k == "eval/accuracy" else k.rsplit("_", 1)[1] + " digits"
             for k in keys]
    lines = [f"Seeds {a.seeds}, {a.steps} learner steps per arm, from the same base policy; "
             f"greedy accuracy on 400 held-out problems (4 digits: out of distribution); "
             f"mean ± std over seeds. Total wall time {seconds / 60:.0f} min.", "",
             "| arm | " + " | ".join(names) + " | demos used |",
             "|---|" + "---|" * (len(keys) + 1),
             "| base (start) | " + " | ".join(f"{base[k]:.3f}" for k in keys) + " | 0 |"]
    for arm, runs in results.items():
        cells = [_ms([r["eval"][-1][k] for r in runs]) for k in keys]
        used = [r.get("demos", {}).get("demos/used", 0.0) for r in runs]
        demos = f"{statistics.mean(used):.0f}" + (f" ± {statistics.stdev(used):.0f}"
                                                   if len(used) > 1 else "")
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {demos} |")
    text = "\n".join(lines) + "\n"
    (RUNS / f"{a.out}.md").write_text(text)
    return text


def plot(results, out: str = "results") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = _bucket_keys(results)
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(results)
    for i, (arm, runs) in enumerate(results.items()):
        means = [statistics.mean(r["eval"][-1][k] for r in runs) for k in keys]
        stds = [statistics.stdev([r["eval"][-1][k] for r in runs]) if len(runs) > 1 else 0
                for k in keys]
        ax.bar([j + i * width for j in range(len(keys))], means, width, yerr=stds, label=arm)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
    ax.set_xticklabels(["overall" if k == "eval/accuracy" else k.rsplit("_", 1)[1] + " digits"
                        for k in keys])
    ax.set_ylabel("held-out greedy accuracy")
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(RUNS / f"{out}.png", dpi=120)


if __name__ == "__main__":
    main()
