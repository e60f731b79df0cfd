"""`ray job submit --working-dir . -- braid run ...` against a head this test starts itself
(`ray start --head` on private ports and its own temp dir, token auth off for both start and
submit — see ENVIRONMENT.md), stopped by killing only the processes it started.

Job 1 runs a recipe whose verifier lives in the submitted working directory, shows progress in
the job log, and is stopped with `ray job stop`: braid finishes the step, writes a checkpoint
and exits. Job 2 resumes it to the end and succeeds."""

import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from ray.job_submission import JobSubmissionClient

from tests.conftest import recipe_dict
from tests.integration.ray_nodes import VENV_BIN, Nodes, ports

pytestmark = pytest.mark.slow

USER_VERIFIER = '''
def exact(prompts, completions, answer, reverse=None, **_):
    """The user's own verifier, importable only from the submitted working directory."""
    reverse = reverse or [False] * len(completions)
    return [1.0 if (c.strip()[::-1] if r else c.strip()) == str(a) else 0.0
            for c, a, r in zip(completions, answer, reverse)]
'''


@pytest.fixture(scope="module")
def ray_head():
    nodes = Nodes()
    fixed = ports("--dashboard-port", "--port", "--ray-client-server-port",
                  "--dashboard-agent-listen-port")  # Ray picks free ports for the others
    try:
        nodes.start("head", [
            "--head", "--temp-dir", nodes.temp_dir, "--node-ip-address", "127.0.0.1",
            "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--num-cpus", "4",
            "--min-worker-port", "0", "--max-worker-port", "0", *fixed])
        address = f"http://127.0.0.1:{fixed[1]}"
        # the job API answers once the dashboard is up (bounded for a loaded machine; a
        # failure shows what the head said)
        deadline, seen = time.monotonic() + 300, ""
        while True:
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=10):
                    break
            except OSError as err:
                seen = f"{type(err).__name__}: {err}"
            up = nodes.procs["head"].poll() is None
            assert up and time.monotonic() < deadline, (
                f"the head's job API did not answer at {address} within 300 s (ray start "
                f"{'running' if up else 'exited'}; last: {seen})\n{nodes.logs()}")
            time.sleep(1)
        yield address, nodes.env
    finally:
        nodes.stop()


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
    # until the job's log shows step 3 (asked over the job API, not by a `ray` process a
    # poll: those would load the machine the job runs on)
    client = JobSubmissionClient(address)
    deadline = time.monotonic() + 500
    while not re.search(r"step\s+3/5000", logs := client.get_job_logs(job)):
        status = client.get_job_status(job)
        assert not status.is_terminal(), f"job {job} ended {status}: {logs[-4000:]}"
        assert time.monotonic() < deadline, f"job {job} ({status}) did not log step 3 " \
            f"within 500 s: {logs[-4000:]}"
        time.sleep(2)
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
