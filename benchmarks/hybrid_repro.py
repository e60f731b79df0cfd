"""Hybrid SFT/RL studies on arithmetic: arms x seeds, one table and one plot per study.

    make repro                      # the hidden-skill study (= --study hidden)
    make repro STUDY=arith          # the first study: additions only
    .venv/bin/python benchmarks/hybrid_repro.py --study hidden --seeds 0 1 2 --arms grpo relift

Stage 1 trains a shared base policy (recipes/repro/base.yaml: SFT warm-up on 1-3 digit
additions). Stage 2 runs every arm from it with the same learner-step budget (``--steps``) and
at most the same rollouts per step, for each seed, each a real `braid run`:

- ``arith`` (recipes/repro/arm.yaml): more additions; eval by operand digits, 4 digits out of
  distribution. Every prompt needs the skill the base already has.
- ``hidden`` (recipes/repro/hidden.yaml): half the prompts are subtractions, which the base
  never solves (pass@8 ~ 0: no RL gradient) but whose demonstrations teach them; eval by family
  (add, sub and their 4-digit out-of-distribution sets).

ReLIFT runs first: the ``sft_matched`` arm then gets as many demonstrations as ReLIFT used
(mean over seeds). Finished runs are kept and reused (``--fresh`` reruns them), so the harness
can be stopped and started again. Writes runs/repro/<OUT>.md (mean ± std per arm and bucket,
demonstrations used, and for the hidden study the mechanism metrics read back from mlflow) and
<OUT>.png (default OUT: the study's name); every run logs to mlflow at
sqlite:///runs/repro/mlflow.db.
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
# ReLIFT's and LUFFY's code: no std in the advantage, no clip (importance ratio capped at 2
# instead), Dr. GRPO's constant-length normaliser; ReLIFT: one learning rate for both optimizers,
# an entropy bonus of 1e-3 in both terms, a 64-question buffer (prompts_per_step)
PAPER_RL = ["algorithm.std_normalize=false", "algorithm.clip=null", "algorithm.tis_cap=2.0",
            "algorithm.loss_agg=seq_mean_token_sum_norm"]
HIDDEN_ARMS: dict[str, list[str]] = {
    "grpo": ARMS["grpo"], "sft_full": ARMS["sft_full"], "sft_matched": ARMS["sft_matched"],
    "sft_then_rl": ARMS["sft_then_rl"],
    "relift": ["schedule.policy=relift", *PAPER_RL, "algorithm.entropy=0.001",
               "algorithm.sft_lr=0.0002",
               "schedule.args={buffer_size: 64, entropy: 0.001, optimizer: sft}"],
    # the same with the SFT arms' learning rate (5e-4) for its SFT steps
    "relift_sft_lr": ["schedule.policy=relift", *PAPER_RL, "algorithm.entropy=0.001",
                      "schedule.args={buffer_size: 64, entropy: 0.001, optimizer: sft}"],
    "luffy": ["schedule.policy=luffy", *PAPER_RL, "schedule.args={gamma: 0.1}"],
    "hpt": ARMS["hpt"], "sasr": ARMS["sasr"],
    "chord": ["schedule.policy=chord",
              "schedule.args={mu_peak: 0.9, mu_valley: 0.05, decay_steps: STEPS}"],
}
STUDIES = {  # name: (arms, an arm's recipe unless RECIPES names one, default arms, steps, base)
    "arith": (ARMS, "recipes/repro/arm.yaml", [a for a in ARMS if a != "ppo"], 50, "base"),
    "hidden": (HIDDEN_ARMS, "recipes/repro/hidden.yaml", list(HIDDEN_ARMS), 100, "hidden-base"),
}
RECIPES = {"ppo": "recipes/repro/ppo.yaml"}


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
    ap = argparse.ArgumentParser(description="hybrid SFT/RL studies")
    ap.add_argument("--study", choices=list(STUDIES), default="hidden")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, help="learner steps per arm (default: the study's: "
                    "arith 50, hidden 100)")
    ap.add_argument("--arms", nargs="+", choices=sorted(set(ARMS) | set(HIDDEN_ARMS)),
                    help="default: every arm of the study (arith's ppo: --arms grpo ppo)")
    ap.add_argument("--fresh", action="store_true", help="rerun runs that already finished")
    ap.add_argument("--out", help="names the table and plot: runs/repro/OUT.md, OUT.png "
                    "(default: the study's name)")
    a = ap.parse_args()
    os.chdir(ROOT)  # the recipes' paths, and their mlflow store, are relative to the checkout
    global FRESH
    FRESH = a.fresh
    arms_of, recipe, default, steps, base_name = STUDIES[a.study]
    a.arms, a.out, a.steps = a.arms or default, a.out or a.study, a.steps or steps
    if unknown := [x for x in a.arms if x not in arms_of]:
        sys.exit(f"the {a.study} study has no arm {', '.join(unknown)}: {', '.join(arms_of)}")
    RUNS.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = RUNS / base_name / "checkpoints" / "final"
    if not (base / "config.json").is_file():
        print("stage 1: base policy (SFT warm-up)", flush=True)
        braid_run(f"recipes/repro/{base_name.replace('-', '_')}.yaml",
                  [f"name={'repro-base' if base_name == 'base' else base_name}"],
                  RUNS / f"{base_name}.log", RUNS / base_name)
    prefix = "repro" if a.study == "arith" else a.study
    results: dict[str, list[dict]] = {}
    arms = sorted(a.arms, key=lambda x: x != "relift")  # ReLIFT first: it sets the SFT budget
    for arm in arms:
        print(f"arm {arm}", flush=True)
        over = [o.replace("HALF", str(a.steps // 2)).replace("STEPS", str(a.steps))
                for o in arms_of[arm]]
        if arm == "sft_matched":
            used = [s["demos"]["demos/used"] for s in results.get("relift", [])]
            if not used:
                sys.exit("sft_matched needs the relift arm in the same run")
            over.append(f"data.demo_budget={round(statistics.mean(used))}")
        for seed in a.seeds:
            name = f"{prefix}-{arm}-s{seed}"
            results.setdefault(arm, []).append(braid_run(
                RECIPES.get(arm, recipe), [f"name={name}", f"seed={seed}", f"steps={a.steps}",
                                           *over],
                RUNS / f"{name}.log", RUNS / name))
    table = write_table(results, a, time.time() - t0)
    print(table)
    plot(results, a.out, a.study)


def _bucket_keys(results, metric: str = "eval/accuracy") -> list[str]:
    last = next(iter(results.values()))[0]["eval"][-1]
    return [metric] + sorted(k for k in last if k.startswith(metric + "/"))


def _label(key: str) -> str:  # eval/accuracy/digits_3 -> "3 digits", .../family_sub -> "sub"
    if key.count("/") == 1:
        return "overall"
    bucket = key.rsplit("/", 1)[1]
    if bucket.startswith("digits_"):
        return bucket.split("_", 1)[1] + " digits"
    return bucket.split("_", 1)[1] if bucket.startswith("family_") else bucket


def _ms(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


def mechanism(summary: dict) -> dict[str, float]:
    """Per-step signals of one run, read back from its mlflow run: the fraction of groups with
    zero reward variance (mean over steps), each family's training pass rate (avg@n over the
    first and last 5 steps), the steps that trained on demonstrations, the policy's entropy."""
    from mlflow.tracking import MlflowClient

    ml = summary["mlflow"]
    client = MlflowClient(ml["uri"])
    keys = client.get_run(ml["run_id"]).data.metrics

    def hist(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(ml["run_id"], key)}

    out: dict[str, float] = {}
    zv = hist("prompts/zero_variance_frac")
    if zv:
        out["zero_var"] = statistics.mean(zv.values())
    for key in (k for k in keys if k.startswith("train/avg_at_")):  # mlflow's name of avg@
        curve = [v for _, v in sorted(hist(key).items())]
        out[f"{key.rsplit('/', 1)[1]}/first"] = statistics.mean(curve[:5])
        out[f"{key.rsplit('/', 1)[1]}/last"] = statistics.mean(curve[-5:])
    sft = sorted(set(hist("sft/loss")) | set(hist("off/loss")))
    out["sft_steps"] = float(len(sft))
    out["sft_first"] = float(sft[0]) if sft else float("nan")
    ent = hist("rl/entropy") or hist("sft/entropy")
    out["entropy"] = statistics.mean([v for _, v in sorted(ent.items())][-10:]) if ent else \
        float("nan")
    return out


def write_table(results, a, seconds: float) -> str:
    keys = _bucket_keys(results)
    base = next(iter(results.values()))[0]["eval"][0]
    what = "by operand digits (4: out of distribution)" if a.study == "arith" else \
        "by family (add, sub: 1-3 digits as trained; *_ood: 4 digits, never trained)"
    lines = [f"Study {a.study}: seeds {a.seeds}, {a.steps} learner steps per arm, from the same "
             f"base policy; greedy accuracy on 400 held-out problems {what}; mean ± std over "
             f"seeds. Total wall time {seconds / 60:.0f} min.", "",
             "| arm | " + " | ".join(map(_label, keys)) + " | demos used |",
             "|---|" + "---|" * (len(keys) + 1),
             "| base (start) | " + " | ".join(f"{base[k]:.3f}" for k in keys) + " | 0 |"]
    for arm, runs in results.items():
        cells = [_ms([r["eval"][-1][k] for r in runs]) for k in keys]
        used = [r.get("demos", {}).get("demos/used", 0.0) for r in runs]
        demos = f"{statistics.mean(used):.0f}" + (f" ± {statistics.stdev(used):.0f}"
                                                   if len(used) > 1 else "")
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {demos} |")
    passk = [k for k in base if k.startswith("eval/pass@")]
    if passk:
        lines += ["", "Base policy, pass@k of sampled completions at step 0: " + ", ".join(
            f"{_label(k)} {base[k]:.3f}" for k in sorted(passk, key=len))]
    mech = {arm: [mechanism(r) for r in runs] for arm, runs in results.items()}
    fams = sorted({k.split("/")[0] for ms in mech.values() for m in ms for k in m
                   if k.endswith("/first")})
    lines += ["", "Mechanism (mean over seeds; from mlflow): groups with zero reward variance "
              "(mean over steps), training pass rate avg@n per family over the first -> last 5 "
              "steps, steps that trained on demonstrations (first such step), policy entropy "
              "(mean of the last 10 steps).", "",
              "| arm | zero-var groups | " + " | ".join(f"{_label('x/y/' + f)} pass"
                                                       for f in fams) +
              " | demo steps (first) | entropy |",
              "|---|---|" + "---|" * len(fams) + "---|---|"]
    for arm, ms in mech.items():
        def mean(key, ms=ms):
            vals = [m[key] for m in ms if key in m and m[key] == m[key]]
            return statistics.mean(vals) if vals else float("nan")
        def fmt(x, spec=".2f"):
            return format(x, spec) if x == x else "–"  # nan: the arm has no such step

        cells = [f"{fmt(mean(f + '/first'))} -> {fmt(mean(f + '/last'))}" for f in fams]
        first = mean("sft_first")
        lines.append(f"| {arm} | {fmt(mean('zero_var'))} | " + " | ".join(cells) +
                     f" | {mean('sft_steps'):.0f}" + (f" ({first:.0f})" if first == first else "")
                     + f" | {fmt(mean('entropy'), '.3f')} |")
    text = "\n".join(lines) + "\n"
    (RUNS / f"{a.out}.md").write_text(text)
    return text


def _curve(summary: dict, key: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    ml = summary["mlflow"]
    return {m.step: m.value
            for m in MlflowClient(ml["uri"]).get_metric_history(ml["run_id"], key)}


def plot(results, out: str, study: str) -> None:
    """Accuracy after the run by arm and bucket; for the hidden study beside it, each arm's
    training success on the hidden family (train/avg@8/family_sub, mean over seeds, smoothed
    over 5 steps) step by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = _bucket_keys(results)
    hidden = study == "hidden"
    fig, axes = plt.subplots(1, 2 if hidden else 1, figsize=(15 if hidden else 10, 4.5),
                             gridspec_kw={"width_ratios": [3, 2]} if hidden else None)
    ax = axes[0] if hidden else axes
    width = 0.8 / len(results)
    for i, (arm, runs) in enumerate(results.items()):
        means = [statistics.mean(r["eval"][-1][k] for r in runs) for k in keys]
        stds = [statistics.stdev([r["eval"][-1][k] for r in runs]) if len(runs) > 1 else 0
                for k in keys]
        ax.bar([j + i * width for j in range(len(keys))], means, width, yerr=stds, label=arm,
               color=f"C{i % 10}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
    ax.set_xticklabels([_label(k) for k in keys])
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_title(f"{study}: accuracy after the run (mean ± std over seeds)")
    ax.legend(ncol=5, fontsize=8)
    if hidden:
        ax = axes[1]
        for i, (arm, runs) in enumerate(results.items()):  # the colours of the bars
            curves = [c for c in (_curve(r, "train/avg_at_8/family_sub") for r in runs) if c]
            if not curves:  # SFT only: no rollouts
                continue
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            mean = [statistics.mean(c[t] for c in curves) for t in steps]
            smooth = [statistics.mean(mean[max(0, i - 4):i + 1]) for i in range(len(steps))]
            ax.plot(steps, smooth, label=arm, color=f"C{i % 10}")
        ax.set_xlabel("learner step")
        ax.set_ylabel("training success on sub (avg@8)")
        ax.set_title("the hidden family during training")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RUNS / f"{out}.png", dpi=120)


if __name__ == "__main__":
    main()
