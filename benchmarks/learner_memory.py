"""Peak learner memory per token, long completions on CPU, A/B in one run.

    .venv/bin/python benchmarks/learner_memory.py [--rows 16] [--seq 2048] [--prompt 128]
        [--rounds 1] [--baseline-code DIR] [--model-dir DIR]

One learner rank (``DeepSpeedLearner``, ZeRO-3 on gloo, driven without Ray) takes one RL step
on ``--rows`` rows of ``--seq`` tokens (prompt seq/16, the rest completion) of a small Qwen2
(hidden 128, 2 layers, SmolLM2's 49,152-token vocabulary: the vocabulary is what makes
long completions expensive). Each configuration runs in a fresh process, alternating,
``--rounds`` times; the figure is the process's peak RSS minus its RSS before the step:

- ``rows16``:  16 rows per micro-batch, no token budget, one pass through the vocabulary
               projection, no gradient checkpointing — today's defaults before the token budget;
- ``bounded``: a 4,096-token budget per micro-batch, gradient checkpointing, the vocabulary
               projection 1,024 tokens at a time.

``--model-dir DIR`` uses a model folder instead (e.g. the base model a recipe built).
``--baseline-code DIR`` adds ``before``: the same step on another checkout of braid (e.g. a
``git worktree`` of the commit before the packed learner), with 16 rows per micro-batch.
Memory does not depend on the machine's load, so one round is usually enough; time is
printed for information only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "rows16": {"micro_batch_size": 16, "learner": {"logprob_chunk_tokens": None,
                                                   "gradient_checkpointing": False}},
    "bounded": {"micro_batch_size": None, "max_tokens_per_micro_batch": 4096,
                "learner": {"logprob_chunk_tokens": 1024, "gradient_checkpointing": True}},
    "before": {"micro_batch_size": 16, "learner": {}},  # run on --baseline-code
}


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    return kb / 2**20


def child(config: str, model: Path, rows: int, seq: int, prompt: int, port: int) -> None:
    """One step in this process; prints a JSON line."""
    from orchestrator.config import Recipe
    from workers.base import WorkerContext
    from workers.learner.deepspeed import DeepSpeedLearner
    from workers.learner.terms import PolicyGradient
    from workers.types import Rollouts

    cfg = CONFIGS[config]
    algo = {"lr": 1e-5, "micro_batch_size": cfg["micro_batch_size"]}
    if "max_tokens_per_micro_batch" in cfg:
        algo["max_tokens_per_micro_batch"] = cfg["max_tokens_per_micro_batch"]
    learner = {"zero_stage": 3, "threads": 2} | cfg["learner"]
    recipe = Recipe.model_validate({
        "name": "mem", "steps": 1, "run_dir": str(model.parent / "run"),
        "model": {"path": str(model), "dtype": "float32"},
        "data": {"train": {"cls": "orchestrator.data:Arithmetic"}},
        "roles": {"rollout": {"cls": "workers.rollout.vllm:VLLMRollout"},
                  "learner": {"cls": "workers.learner.deepspeed:DeepSpeedLearner",
                              "replicas": 1, "args": learner},
                  "reward": {"cls": "workers.reward:RuleRewardWorker",
                             "args": {"verifiers": ["rewards.arithmetic:exact_answer"]}}},
        "algorithm": algo})
    args = DeepSpeedLearner.check_args(learner, "roles.learner.args")
    w = DeepSpeedLearner(WorkerContext("learner", 0, 1, recipe, args))
    w.setup(master_addr="127.0.0.1", master_port=port)
    from gpu_check import rows as random_rows  # this script's folder: benchmarks/

    rng = random.Random(0)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    p, c = random_rows(rows, seq, prompt, vocab, rng=rng)
    r = Rollouts([i // 4 for i in range(rows)], p, c, [[] for _ in p], [""] * rows,
                 ["length"] * rows)
    adv = [rng.uniform(-1, 1) for _ in p]
    before = rss_gib()
    t0 = time.perf_counter()
    m = w.update([PolicyGradient(rollouts=r, advantages=adv)])
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    tokens = rows * (seq - prompt)  # completion tokens
    print(json.dumps({"config": config, "peak_gib": round(peak, 3),
                      "step_gib": round(peak - before, 3),
                      "step_mib_per_completion_token": round((peak - before) * 1024 / tokens, 4),
                      "seconds": round(seconds, 1), "grad_norm": m["rl/grad_norm"]}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--seq", type=int, default=2048, help="tokens per row")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens per row")
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--baseline-code", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=29541, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model, args.rows, args.seq, args.prompt, args.port)
        return

    sys.path.insert(0, str(ROOT))
    from gpu_check import build_model

    configs = ["rows16", "bounded"] + (["before"] if args.baseline_code else [])
    results: dict[str, list[dict]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="braid-learner-mem-") as tmp:
        model = args.model_dir.resolve() if args.model_dir else Path(tmp) / "model"
        if not args.model_dir:
            build_model("small-49k", model, "float32")
        vocab = json.loads((model / "config.json").read_text())["vocab_size"]
        for rnd in range(args.rounds):
            for config in configs if rnd % 2 == 0 else configs[::-1]:
                code = args.baseline_code if config == "before" else ROOT
                env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(code))
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", config,
                       "--model", str(model), "--rows", str(args.rows), "--seq",
                       str(args.seq), "--prompt", str(args.prompt), "--port",
                       str(args.port + rnd * len(configs) + configs.index(config))]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=code)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
                if proc.returncode or not lines:
                    # the kernel's OOM killer, or an error: say which and go on
                    results[config].append({"config": config, "failed": proc.returncode,
                                            "stderr": proc.stderr[-400:]})
                else:
                    results[config].append(json.loads(lines[-1]))
                print(json.dumps(results[config][-1]), flush=True)
    print(f"\n{args.rows} rows x {args.seq} tokens ({args.prompt} prompt), vocabulary {vocab}:")
    for config, runs in results.items():
        ok = [r for r in runs if "failed" not in r]
        if not ok:
            print(f"  {config:8s} failed in every round (exit {runs[-1]['failed']})")
            continue
        step = max(r["step_gib"] for r in ok)
        print(f"  {config:8s} step peak {step:6.2f} GiB  "
              f"({max(r['step_mib_per_completion_token'] for r in ok):.3f} MiB per completion "
              f"token), process peak {max(r['peak_gib'] for r in ok):.2f} GiB, "
              f"{ok[-1]['seconds']} s")
    if results["rows16"] and results["bounded"] and all(
            "failed" not in r for r in results["rows16"] + results["bounded"]):
        a = max(r["step_gib"] for r in results["rows16"])
        b = max(r["step_gib"] for r in results["bounded"])
        print(f"  bounded / rows16 step memory: {b / a:.3f}")


if __name__ == "__main__":
    main()
