"""Full fine-tuning against LoRA adapters on a real model: SmolLM2-135M-Instruct on the word
problems (recipes/smollm2_word_problems.yaml, GRPO on every step), each arm in turn, alternating
over rounds, in one invocation.

    make smollm2 && .venv/bin/python benchmarks/lora.py [--rounds 1] [--steps 6] \
        [--arms full lora16 lora64] [--eval 100]

Per arm (medians over rounds): a step's wall time over steps 2..steps (step 1 carries the
engines' and learners' first-call costs) and its phases (generate, reward, learn, sync), the
learner ranks' peak memory (RSS on CPU), the bytes and seconds of a weight sync, and held-out
greedy accuracy on the first ``--eval`` test problems before and after the same steps. The full
arm is the recipe as shipped (ZeRO-3, lr 2e-5); the LoRA arms use the adapters' defaults (ZeRO
stage 0, adapters synced alone) and lr 2e-4 (recipes/smollm2_word_problems_lora.yaml). The
``stage`` arms (``lora16@3``) run LoRA on ZeRO-3, to measure the default stage's choice.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.throughput import braid_run  # noqa: E402

RECIPE = ROOT / "recipes" / "smollm2_word_problems.yaml"
LEARNER = ('roles.learner={cls: "workers.learner.deepspeed:DeepSpeedLearner", replicas: 2, '
           'resources: {num_cpus: 0.5}, args: {threads: 1%s}}')


def arm_overrides(arm: str) -> list[str]:
    if arm == "full":
        return []
    name, _, stage = arm.partition("@")
    rank = int(name.removeprefix("lora"))
    return [f"model.lora={{rank: {rank}, alpha: {2 * rank}}}", "algorithm.lr=2.0e-4",
            LEARNER % (f", zero_stage: {stage}" if stage else "")]


def metrics(summary: dict) -> dict:
    import mlflow

    client = mlflow.MlflowClient(summary["mlflow"]["uri"])
    run_id = summary["mlflow"]["run_id"]
    keys = client.get_run(run_id).data.metrics
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k))
            for k in keys}


def one(arm: str, run_dir: Path, steps: int, n_eval: int) -> dict:
    s = braid_run(run_dir, ["schedule={policy: rl}", f"steps={steps}",
                            f"data.eval.args.limit={n_eval}", "logging.console_every=1000",
                            *arm_overrides(arm)], recipe=RECIPE)
    h = metrics(s)

    def per_step(key):
        return [v for step, v in h.get(key, []) if step >= 2]

    phases = {k[5:]: statistics.median(per_step(k)) for k in h
              if k.startswith("time/") and k != "time/eval" and per_step(k)}
    return {"step_s": sum(phases.values()), "phases": phases,
            "peak_gib": max(v for _, v in h["learner/peak_mem_gib"]),
            "sync_mb": statistics.median(per_step("sync/bytes")) / 2**20,
            "sync_s": statistics.median(per_step("sync/seconds")),
            "acc0": s["eval"][0]["eval/accuracy"], "acc": s["eval"][-1]["eval/accuracy"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--eval", type=int, default=100)
    p.add_argument("--arms", nargs="+", default=["full", "lora16", "lora64"])
    args = p.parse_args()
    results: dict[str, list[dict]] = {a: [] for a in args.arms}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for arm in (args.arms if r % 2 == 0 else args.arms[::-1]):
                got = one(arm, Path(tmp) / f"{arm}-{r}", args.steps, args.eval)
                results[arm].append(got)
                print(f"round {r} {arm}: {got}", flush=True)

    def med(arm, key):
        return statistics.median(x[key] for x in results[arm])

    base = med(args.arms[0], "step_s")
    print(f"\n| arm | step s (median, steps 2..{args.steps}) | ratio to {args.arms[0]} | phases "
          "(s) | learner peak GiB/rank | sync MB | sync s | held-out greedy before -> after |")
    print("|---|---|---|---|---|---|---|---|")
    for arm in args.arms:
        phases = {k: statistics.median(x["phases"].get(k, 0.0) for x in results[arm])
                  for k in results[arm][0]["phases"]}
        where = ", ".join(f"{k} {v:.1f}" for k, v in sorted(phases.items(), key=lambda kv: -kv[1]))
        print(f"| {arm} | {med(arm, 'step_s'):.1f} | {med(arm, 'step_s') / base:.2f}x | {where} "
              f"| {med(arm, 'peak_gib'):.2f} | {med(arm, 'sync_mb'):.1f} | "
              f"{med(arm, 'sync_s'):.2f} | {med(arm, 'acc0'):.3f} -> {med(arm, 'acc'):.3f} |")


if __name__ == "__main__":
    main()
