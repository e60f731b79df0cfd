"""Every way Ray reports a lost worker takes braid's recovery path, with real faults: Ray's own
memory monitor killing a reward actor that grows past the node's threshold (on a private
cluster whose threshold the test sets just above what the machine uses now), and the
same role killed again after its replacement, which stops the run in one line naming the role,
what it used and the setting that lowers it. (Rollouts lost with their node: test_node_loss.py;
how each of Ray's errors is read: tests/orchestrator/test_groups.py.)"""

import json
import os
import subprocess
import sys

import psutil
import pytest
import yaml

from tests.conftest import ROOT, recipe_dict

pytestmark = pytest.mark.slow

# what a run of the smallest recipe adds to the machine's memory (driver, Ray, an engine, two
# learner ranks, a reward actor: ~2.5 GB measured here), and the room left above it before the
# monitor's threshold: the hogging verifier crosses it, nothing else does
RUN_GB, ROOM_GB = 3.0, 1.5
# the monitor looks every 100 ms and kills the actors granted last until what they hold brings
# the node under its threshold, plus a kill buffer (none here: with one it can take the next
# newest actor along); the hog is a replacement, so the newest (tests/fixtures/hog.py)
MONITOR = {"RAY_min_memory_free_bytes": "-1", "RAY_memory_monitor_refresh_ms": "100",
           "RAY_max_kill_memory_buffer_bytes": "0"}


def _run_with_hog(tiny_model, tmp_path, always: bool) -> subprocess.CompletedProcess:
    d = recipe_dict(tiny_model, tmp_path / "run", steps=3)
    d["data"]["prompts_per_step"] = 4
    d["roles"]["reward"]["cls"] = "tests.fixtures.hog:HogReward"
    d["roles"]["reward"]["env"] = {"BRAID_HOG_DIR": str(tmp_path),
                                   "BRAID_HOG": "always" if always else "once"}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(d))
    mem = psutil.virtual_memory()
    threshold = (mem.total - mem.available + (RUN_GB + ROOM_GB) * 2**30) / mem.total
    assert threshold < 0.9, f"this machine has too little free memory for the test: {mem}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), **MONITOR,
               RAY_memory_usage_threshold=f"{threshold:.4f}")
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", "recipe.yaml"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500)


def test_an_actor_killed_by_rays_memory_monitor_is_replaced_and_the_step_goes_on(
        tiny_model, tmp_path):
    proc = _run_with_hog(tiny_model, tmp_path, always=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert (tmp_path / "hogged").exists(), "the verifier never ran"
    assert "braid: reward rank 0 failed (reward actor killed by Ray's memory monitor during " \
           "score (node at " in out, out[-5000:]
    assert "ray.exceptions" not in out and "Traceback" not in out, out[-5000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # the step the kill interrupted was scored again by the replacement: no step lost (two
    # replacements: the crash that makes the hog the newest actor, then the kill)
    assert summary["steps"] == 3 and len(summary["reward_curve"]) == 3
    assert summary["restarts"] == {"reward": 2}


@pytest.mark.long
def test_a_role_killed_again_after_its_replacement_stops_in_one_line(tiny_model, tmp_path):
    proc = _run_with_hog(tiny_model, tmp_path, always=True)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-5000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("braid: run failed: reward actor killed by Ray's memory monitor "), \
        proc.stderr[-5000:]
    assert "killed by Ray's memory monitor again after their replacement (using rank 0 " in \
        last, proc.stderr[-5000:]
    assert "Lower it with what the verifiers hold" in last, last
    assert "Traceback" not in proc.stderr, proc.stderr[-5000:]
