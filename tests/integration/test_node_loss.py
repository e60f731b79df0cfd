"""A node lost mid-run: a Ray cluster of two nodes on this machine (a head and a second
`ray start` with its own ports), the run's roles spread across both, and the second node's
raylet killed by PID in the middle of a step — what a KubeRay pod eviction or a reclaimed spot
instance looks like to Ray. The actors there die with it; the learner rank among them ends the
attempt, and ``failures.auto_resume`` brings the run back up on the node that remains, from the
last checkpoint, to the end."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from core.weight_sync import free_port
from tests.conftest import ROOT, recipe_dict
from tests.integration.test_ray_job import stop_nodes

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent


def _ports(*names) -> list[str]:
    return [x for name in names for x in (name, str(free_port()))]


def _start(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


@pytest.fixture
def two_nodes():
    """(GCS address, env, the second node's raylet PID finder); both nodes stopped after."""
    temp_dir = tempfile.mkdtemp(prefix="rn", dir="/tmp")  # short: Ray's socket paths are long
    port = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", BRAID_TEST_HEAD=temp_dir,
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    common = ["--block", "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
              "--min-worker-port", "0", "--max-worker-port", "0"]
    # Ray counts a silent node dead after 3 missed health checks a second apart (default:
    # 5, 3 s apart), so the test waits less for it
    checks = '{"health_check_period_ms": 1000, "health_check_failure_threshold": 3}'
    head = _start([str(VENV_BIN / "ray"), "start", "--head", "--port", str(port),
                   "--system-config", checks,
                   "--temp-dir", temp_dir, "--include-dashboard", "false", "--num-cpus", "4",
                   *common, *_ports("--ray-client-server-port", "--node-manager-port",
                                    "--object-manager-port", "--metrics-export-port",
                                    "--runtime-env-agent-port",
                                    "--dashboard-agent-listen-port",
                                    "--dashboard-agent-grpc-port")], env)
    nodes = [head]
    address = f"127.0.0.1:{port}"
    try:
        second = _ports("--node-manager-port", "--object-manager-port", "--metrics-export-port",
                        "--runtime-env-agent-port", "--dashboard-agent-listen-port",
                        "--dashboard-agent-grpc-port")
        _wait_nodes(address, env, alive=1)
        nodes.append(_start([str(VENV_BIN / "ray"), "start", "--address", address,
                             "--num-cpus", "2", *common, *second], env))
        _wait_nodes(address, env, alive=2)
        assert all(n.poll() is None for n in nodes), "ray start exited"
        manager_port = second[second.index("--node-manager-port") + 1]
        yield address, env, lambda: _raylet(manager_port)
    finally:
        stop_nodes(nodes, temp_dir)


def _wait_nodes(address: str, env: dict, alive: int, timeout_s: float = 120) -> None:
    """Until the cluster counts ``alive`` live nodes."""
    probe = (f"import ray; ray.init(address='{address}', log_to_driver=False); "
             "print(sum(n['Alive'] for n in ray.nodes()))")
    deadline = time.time() + timeout_s
    while subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                         text=True).stdout.strip() != str(alive):
        assert time.time() < deadline, f"the cluster did not reach {alive} live node(s)"
        time.sleep(2)


def _raylet(manager_port: str) -> int:
    """The PID of the raylet listening on ``manager_port`` (the second node's)."""
    for p in Path("/proc").iterdir():
        try:
            cmd = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"/raylet") and \
                f"--node_manager_port={manager_port}".encode() in cmd:
            return int(p.name)
    raise AssertionError(f"no raylet with --node_manager_port={manager_port}")


def test_a_node_lost_mid_step_is_survived_with_auto_resume(two_nodes, tiny_model, tmp_path):
    address, env, raylet = two_nodes
    d = recipe_dict(tiny_model, tmp_path / "run", steps=6)
    d["data"]["prompts_per_step"] = 4
    d["checkpoint"] = {"every": 2}
    d["failures"] = {"auto_resume": 1}
    d["ray"] = {"address": address}
    # SPREAD: one learner rank and one reward actor on each node (4 + 2 CPUs; the head alone
    # holds the whole recipe, 3.5 CPUs, for the attempt after the loss)
    d["roles"]["learner"]["strategy"] = "SPREAD"
    d["roles"]["reward"] |= {"replicas": 2, "strategy": "SPREAD",
                             "resources": {"num_cpus": 0.25}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(d))
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", "recipe.yaml"],
                            cwd=tmp_path, env=dict(env, PYTHONPATH=str(ROOT)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
    out, killed = [], None
    for line in proc.stdout:  # the kill lands while step 4 runs
        out.append(line)
        if killed is None and re.match(r"step\s+3/6", line):
            # the driver held still while the node goes (a step here takes ~0.1 s, less than
            # Ray needs to notice a lost node), released once the cluster counts it dead
            os.kill(proc.pid, signal.SIGSTOP)
            killed = raylet()
            os.kill(killed, signal.SIGKILL)
            _wait_nodes(address, env, alive=1)
            os.kill(proc.pid, signal.SIGCONT)
    proc.wait(timeout=900)
    stdout, stderr = "".join(out), "".join(err)
    assert killed is not None, stdout[-3000:] + stderr[-3000:]
    assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    assert re.search(r"learner rank\(s\) \[\d\] died", stderr), stderr[-3000:]
    assert f"auto_resume: restarting from {ckpt}" in stderr
    assert f"resumed from {ckpt} at step 2" in stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["eval"][-1]["step"] == 6
    assert summary["restarts"].get("learner") == 1
