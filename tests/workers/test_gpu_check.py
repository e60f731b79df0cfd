"""benchmarks/gpu_check.py at toy size on CPU, so the script a lent GPU machine runs cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_on_cpu_at_toy_size():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"),
                           "--size", "toy", "--steps", "1", "--port", "29531"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    records = {r["check"]: r for r in (json.loads(line) for line in proc.stdout.splitlines()
                                       if line.startswith("{"))}
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert set(records) == {"build", "logprobs", "learner", "all"}
    assert all(r["ok"] for r in records.values())
    lp = records["logprobs"]
    assert lp["tokens"] > lp["chunk"]  # the chunked path really ran in several chunks
    learner = records["learner"]
    assert learner["tokens_per_step"] == 4 * 256 and learner["grad_norm"] > 0
    assert learner["peak_gib"] > 0 and learner["tokens_per_s"] > 0
