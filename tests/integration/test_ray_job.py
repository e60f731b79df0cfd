"""`ray job submit --working-dir . -- braid run ...` against a head this test starts itself
(`ray start --head` on private ports and its own temp dir, token auth off for both start and
submit — see ENVIRONMENT.md), stopped by killing only the processes it started.

Job 1 runs a recipe whose verifier lives in the submitted working directory, shows progress in
the job log, and is stopped with `ray job stop`: braid finishes the step, writes a checkpoint
and exits. Job 2 resumes it to the end and succeeds."""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from core.weight_sync import free_port
from tests.conftest import recipe_dict

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
USER_VERIFIER = '''
def exact(prompts, completions, answer, reverse=None, **_):
    """The user's own verifier, importable only from the submitted working directory."""
    reverse = reverse or [False] * len(completions)
    return [1.0 if (c.strip()[::-1] if r else c.strip()) == str(a) else 0.0
            for c, a, r in zip(completions, answer, reverse)]
'''


def _ours(temp_dir: str) -> list[int]:
    """Processes whose command line or environment mentions our head's temp dir."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            text = (p / "cmdline").read_bytes() + (p / "environ").read_bytes()
        except OSError:
            continue
        if temp_dir.encode() in text:
            pids.append(int(p.name))
    return pids


@pytest.fixture(scope="module")
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths are long
    port, dash = free_port(), free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", BRAID_TEST_HEAD=temp_dir,
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    ports = {"--port": port, "--dashboard-port": dash, "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(),
             "--dashboard-agent-grpc-port": free_port(), "--node-manager-port": free_port(),
             "--object-manager-port": free_port(), "--metrics-export-port": free_port(),
             "--runtime-env-agent-port": free_port()}
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--temp-dir", temp_dir,
           "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
           "--include-dashboard", "true", "--num-cpus", "4", "--disable-usage-stats",
           "--min-worker-port", "0", "--max-worker-port", "0"]
    cmd += [x for k, v in ports.items() for x in (k, str(v))]
    head = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", address],
                             env=env, capture_output=True).returncode != 0:
            assert head.poll() is None, "ray start --head exited"
            assert time.time() < deadline, "the head's dashboard did not come up in 120 s"
            time.sleep(2)
        yield address, env
    finally:
        stop_nodes([head], temp_dir)


def stop_nodes(nodes: list[subprocess.Popen], temp_dir: str) -> None:
    """Stop the `ray start --block` processes a test started, then anything left that names
    its temp dir (never `ray stop`: that kills every Ray on the machine)."""
    for n in nodes:
        try:
            os.killpg(n.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for n in nodes:
        try:
            n.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(n.pid, signal.SIGKILL)
    deadline = time.time() + 20
    while _ours(temp_dir) and time.time() < deadline:
        time.sleep(1)
    for pid in _ours(temp_dir):
        os.kill(pid, signal.SIGKILL)
    assert not _ours(temp_dir)
    shutil.rmtree(temp_dir, ignore_errors=True)


def _ray(env, *args, check=True, timeout=600):
    proc = subprocess.run([str(VENV_BIN / "ray"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def test_submit_stop_and_resume_a_job(ray_head, tiny_model, tmp_path):
    address, env = ray_head
    project = tmp_path / "project"
    project.mkdir()
    (project / "my_verifiers.py").write_text(USER_VERIFIER)
    run_dir = tmp_path / "run"  # absolute: every job unpacks its working dir somewhere new
    d = recipe_dict(tiny_model, run_dir, steps=5000)  # far more than it runs: it is stopped
    d["data"]["prompts_per_step"] = 4
    d["roles"]["reward"]["args"]["verifiers"] = ["my_verifiers:exact"]
    (project / "recipe.yaml").write_text("# job test\n" + yaml.safe_dump(d))
    runtime_env = ('{"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "300", '
                   '"PYTHONUNBUFFERED": "1"}}')
    submit = ["job", "submit", "--address", address, "--working-dir", ".",
              "--runtime-env-json", runtime_env, "--no-wait", "--"]

    out = subprocess.run([str(VENV_BIN / "ray"), *submit, "braid", "run", "recipe.yaml"],
                         cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    job = re.search(r"raysubmit_\w+", out.stdout).group(0)
    deadline, logs = time.time() + 420, ""
    while not re.search(r"step\s+3/5000", logs):
        assert time.time() < deadline, logs[-4000:]
        status = _ray(env, "job", "status", "--address", address, job).stdout
        assert "FAILED" not in status, _ray(env, "job", "logs", "--address", address, job).stdout
        time.sleep(3)
        logs = _ray(env, "job", "logs", "--address", address, job).stdout
    _ray(env, "job", "stop", "--address", address, job)
    assert "stopped" in _ray(env, "job", "status", "--address", address, job).stdout.lower()
    logs = _ray(env, "job", "logs", "--address", address, job).stdout
    stopped = re.search(r"stopped by SIGTERM after step (\d+)/5000; checkpoint: (\S+)", logs)
    assert stopped, logs[-4000:]
    step, ckpt = int(stopped.group(1)), Path(stopped.group(2))
    assert ckpt == run_dir.resolve() / "checkpoints" / f"step_{step:06d}"
    assert (run_dir / "checkpoints" / "latest").read_text() == ckpt.name

    end = step + 2
    out = subprocess.run([str(VENV_BIN / "ray"), *submit[:-2], "--", "braid", "run",
                          "recipe.yaml", f"steps={end}", "--resume"],
                         cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "succeeded" in out.stdout.lower(), out.stdout[-4000:]
    assert f"resumed from {ckpt} at step {step}" in out.stdout
    assert re.search(rf"step\s+{end}/{end}", out.stdout)
    assert (run_dir / "summary.json").is_file()
