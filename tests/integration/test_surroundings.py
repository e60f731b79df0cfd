"""The run's surroundings fail in one line and lose nothing: a run directory that cannot be made,
a tracking server that is not there, and the disk filling up while a checkpoint is written —
for real, on a small tmpfs mounted in a mount namespace of the run's own (`unshare`)."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from core.weight_sync import free_port
from tests.conftest import ROOT, recipe_dict


def _braid(args: list[str], cwd, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), **env))


def test_a_run_dir_under_a_file_is_one_line(tiny_model, tmp_path):
    (tmp_path / "taken").write_text("a file")
    d = recipe_dict(tiny_model, tmp_path / "taken" / "run")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(d))
    said = (f"braid: recipe error: run_dir: cannot make '{tmp_path / 'taken' / 'run'}': "
            f"'{tmp_path / 'taken'}' is a file")
    for cmd in ("validate", "run"):
        out = _braid([cmd, "recipe.yaml"], tmp_path)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
        line = out.stderr.strip()
        assert line.startswith(said) and "\n" not in line, out.stderr
    # validating away from the cluster whose volume the run_dir is on
    skipped = _braid(["validate", "--skip-data", "recipe.yaml"], tmp_path)
    assert skipped.returncode == 0 and "not checked (--skip-data)" in skipped.stdout


def test_a_tracking_server_that_is_not_there_is_named_before_the_run(tiny_model, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    d = recipe_dict(tiny_model, tmp_path / "run")
    d["logging"] = {"mlflow_uri": uri}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(d))
    for cmd in ("validate", "run"):
        out = _braid([cmd, "recipe.yaml"], tmp_path)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
        line = out.stderr.strip()
        assert line.startswith(f"braid: recipe error: logging.mlflow_uri: no tracking server "
                               f"answers at {uri} (ConnectionError: ") and "\n" not in line, line
    skipped = _braid(["validate", "--skip-mlflow", "recipe.yaml"], tmp_path)
    assert skipped.returncode == 0 and "not checked (--skip-mlflow)" in skipped.stdout


@pytest.mark.long
@pytest.mark.slow
def test_a_full_disk_while_checkpointing_stops_in_one_line_and_keeps_the_last_one(
        tiny_model, tmp_path):
    """The run directory on a 64 MiB tmpfs; once step 2's checkpoint is written the test fills
    the disk, so mlflow's store fails from step 3 and step 4's checkpoint cannot be written."""
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    out.mkdir()
    d = recipe_dict(tiny_model, disk / "run", steps=6)
    d["data"]["prompts_per_step"] = 4
    d["checkpoint"] = {"every": 2}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(d))
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    script = (f"mount -t tmpfs -o size=64m tmpfs {disk} && {sys.executable} -m "
              f"orchestrator.cli run recipe.yaml; rc=$?; cp -a {disk}/run {out}/; exit $rc")
    proc = subprocess.Popen(["unshare", *user, "--mount", "--propagation", "private", "sh",
                             "-c", script], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    lines, filled = [], False
    try:
        for line in proc.stdout:
            lines.append(line)
            if not filled and line.startswith("step    2/6"):  # after its checkpoint
                filled = _fill(proc.pid, disk)
        stderr = proc.stderr.read()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stdout = "".join(lines)
    assert filled, stdout[-3000:] + stderr[-3000:]
    assert proc.returncode == 1, stdout[-3000:] + stderr[-3000:]
    assert "Traceback" not in stdout + stderr, stderr[-5000:]
    ckpts = out / "run" / "checkpoints"
    failed = [ln for ln in stderr.strip().splitlines() if ln.startswith("braid: run failed")]
    assert len(failed) == 1, stderr[-5000:]
    assert failed[0].startswith(f"braid: run failed: the checkpoint of step 4 could not be "
                                f"written to {disk}/run/checkpoints/step_000004.tmp: no space "
                                f"left on device ("), failed
    assert failed[0].endswith(f"the previous checkpoint is kept ({disk}/run/checkpoints/"
                              f"step_000002, the one --resume uses)"), failed
    # the previous checkpoint is whole and `latest` names it; the failed one left nothing
    assert (ckpts / "latest").read_text() == "step_000002"
    state = json.loads((ckpts / "step_000002" / "controller.json").read_text())
    assert state["step"] == 2
    assert not (ckpts / "step_000004.tmp").exists()
    # the tracking store's failures are one line each, not mlflow's tracebacks
    warned = [ln for ln in stderr.splitlines() if ln.startswith("braid: warning: mlflow")]
    assert any("database or disk is full" in ln for ln in warned), stderr[-3000:]
    assert not [ln for ln in stderr.splitlines() if "sqlalchemy" in ln.lower()], stderr[-3000:]


def _fill(pid: int, disk) -> bool:
    """Fill the tmpfs the run (a child of ``pid``, in its mount namespace) writes to."""
    import psutil

    for child in psutil.Process(pid).children(recursive=True):
        if "orchestrator.cli" in " ".join(child.cmdline()):
            path = f"/proc/{child.pid}/root{disk}/filler"
            try:
                with open(path, "wb") as f:
                    while True:
                        f.write(b"\0" * 2**20)
                        f.flush()
            except OSError:
                return True
    return False
