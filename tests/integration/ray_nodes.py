"""Ray clusters that tests start with `ray start` (the job test's head, the node-loss test's two
nodes), apart from the session's private cluster: each on its own temp dir and ports, its
output kept in a file, waited for by what it is (a node registered with the GCS, alive), and
stopped by killing only the processes it started (never `ray stop`: that kills every Ray on the
machine). A wait that fails says what it saw: the nodes the GCS knows and why it counts any of
them dead, which `ray start` exited, and the tail of each node's own logs."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


@dataclass
class Nodes:
    """The `ray start --block` processes of one test cluster and where they write."""

    temp_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="rn", dir="/tmp"))
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def env(self) -> dict:
        env = dict(os.environ, RAY_AUTH_MODE="disabled", BRAID_TEST_HEAD=self.temp_dir,
                   PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
        env.pop("RAY_ADDRESS", None)
        return env

    def start(self, name: str, args: list[str], env: dict | None = None) -> subprocess.Popen:
        """``ray start --block ARGS``, its output in ``<temp_dir>/<name>.log``; ``env``: more
        environment for this node (e.g. its memory monitor's ``RAY_*`` settings)."""
        log = open(Path(self.temp_dir) / f"{name}.log", "wb")  # noqa: SIM115 (the child's)
        self.procs[name] = subprocess.Popen(
            [str(VENV_BIN / "ray"), "start", "--block", "--disable-usage-stats", *args],
            env=self.env | (env or {}), start_new_session=True, stdout=log,
            stderr=subprocess.STDOUT)
        log.close()
        return self.procs[name]

    def wait(self, address: str, alive: int, up: tuple[str, ...] = (),
             timeout_s: float = 300) -> list:
        """Until the GCS at ``address`` counts ``alive`` live nodes (asked directly: no driver
        joins the cluster to count). ``up``: the `ray start` processes that must stay running
        meanwhile — one that exits fails the wait at once. Returns the GCS's node infos."""
        from ray._raylet import GcsClient

        deadline, seen = time.monotonic() + timeout_s, "the GCS did not answer yet"
        while True:
            try:
                nodes = list(GcsClient(address=address).get_all_node_info(timeout=10).values())
                seen = "; ".join(_describe(n) for n in nodes) or "no node"
                if sum(_alive(n) for n in nodes) == alive:
                    return nodes
            except Exception as err:  # the GCS still starting (or gone)
                seen = f"the GCS did not answer: {type(err).__name__}: {err}"
            exited = [name for name in up if self.procs[name].poll() is not None]
            if exited or time.monotonic() > deadline:
                why = (f"`ray start` of {exited} exited" if exited
                       else f"not within {timeout_s:.0f}s")
                raise AssertionError(f"the cluster at {address} did not reach {alive} live "
                                     f"node(s): {why}; the GCS knows: {seen}\n{self.logs()}")
            time.sleep(1)

    def logs(self, lines: int = 15) -> str:
        """The tail of each `ray start` output and of each node's raylet and GCS logs."""
        files = sorted(Path(self.temp_dir).glob("*.log"))
        session = Path(self.temp_dir) / "session_latest" / "logs"
        files += sorted(p for pat in ("raylet*.out", "raylet*.err", "gcs_server.out",
                                      "dashboard_agent*.log", "runtime_env_agent*.log")
                        for p in session.glob(pat))
        out = []
        for f in files:
            try:
                tail = f.read_text(errors="replace").splitlines()[-lines:]
            except OSError as err:
                tail = [f"(unreadable: {err})"]
            out.append(f"--- {f.relative_to(self.temp_dir)} ---\n" + "\n".join(tail))
        return "\n".join(out) or f"(no logs under {self.temp_dir})"

    def stop(self) -> None:
        """Stop the `ray start` processes, then anything left that names the temp dir."""
        stop_nodes(list(self.procs.values()), self.temp_dir)


def _alive(node) -> bool:
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    return node.state == GcsNodeInfo.ALIVE


def _describe(node) -> str:
    state = "ALIVE" if _alive(node) else "DEAD"
    why = node.death_info.reason_message if not _alive(node) else ""
    return (f"node {node.node_id.hex()[:8]} (node manager port {node.node_manager_port}) "
            f"{state}{': ' + why if why else ''}")


def ports(*names: str) -> list[str]:
    """``--flag <port>`` for each flag, ports free now and distinct: chosen together, each
    socket held until all are (ports taken one at a time can repeat — two of a node's flags
    once got the same port and its `ray start` exited, seen here). Only for flags whose Ray
    default is a fixed port another cluster on this machine may hold; Ray picks the others."""
    socks = []
    try:
        for _ in names:
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [x for name, s in zip(names, socks) for x in (name, str(s.getsockname()[1]))]
    finally:
        for s in socks:
            s.close()


def _ours(temp_dir: str) -> list[int]:
    """Processes whose command line or environment mentions the test cluster's temp dir."""
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
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not _ours(temp_dir)
    shutil.rmtree(temp_dir, ignore_errors=True)


@contextmanager
def two_nodes(head_cpus: int, second_cpus: int, system_config: dict | None = None,
              head_env: dict | None = None):
    """A head (`ray start --head`, with ``head_env`` added to its environment) and a second
    node (`ray start --address`) on this machine, on ports of their own: yields (GCS address,
    the cluster, the second node's raylet PID finder); both stopped after."""
    import json

    nodes = Nodes()
    common = ["--node-ip-address", "127.0.0.1", "--min-worker-port", "0",
              "--max-worker-port", "0"]
    # Ray counts a silent node dead after 3 missed health checks a second apart (default:
    # 5, 3 s apart), so a test waits less for it
    config = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3} | (
        system_config or {})
    head = ports("--port", "--ray-client-server-port", "--dashboard-agent-listen-port")
    address = f"127.0.0.1:{head[1]}"
    try:
        nodes.start("head", ["--head", "--system-config", json.dumps(config), "--temp-dir",
                             nodes.temp_dir, "--include-dashboard", "false", "--num-cpus",
                             str(head_cpus), *common, *head], env=head_env)
        nodes.wait(address, alive=1, up=("head",))
        nodes.start("second", ["--address", address, "--num-cpus", str(second_cpus), *common,
                               *ports("--dashboard-agent-listen-port")])
        nodes.wait(address, alive=2, up=("head", "second"))
        yield address, nodes, lambda: raylet_pid(nodes.procs["second"].pid)
    finally:
        nodes.stop()


def raylet_pid(start_pid: int) -> int:
    """The PID of the raylet that the `ray start` process ``start_pid`` launched (its child: the
    raylet's own command line says only ``--node_manager_port=0`` when Ray picks the port)."""
    seen = []
    for p in Path("/proc").iterdir():
        try:
            cmd = (p / "cmdline").read_bytes().split(b"\0")
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == start_pid:
            seen.append(f"{p.name}: {cmd[0].decode(errors='replace')}")
            if cmd[0].endswith(b"/raylet"):
                return int(p.name)
    raise AssertionError(f"`ray start` (PID {start_pid}) has no raylet child; its children: "
                         f"{seen or 'none'}")
