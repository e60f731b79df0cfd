"""The code sandbox stops what a model's program might do wrong or on purpose (loops, memory,
forks, subprocesses, writes outside its directory, network, output floods), leaves no process or
directory behind, and keeps working afterwards; CodeTests scores through the reward worker."""

from __future__ import annotations

import socket
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from rewards import sandbox
from rewards.sandbox import CodeTests, run_code

ROOT = Path(__file__).resolve().parents[2]
ADD = "a, b = map(int, input().split())\nprint(a + b)\n"
ADD_TESTS = [{"input": "2 3\n", "output": "5\n"}, {"input": "10 -4\n", "output": "6\n"}]


def _marked(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in arg for arg in p.info["cmdline"] or ()):
                found.append(p)
        except psutil.Error:
            pass
    return found


@pytest.fixture(autouse=True)
def leaves_nothing_behind(monkeypatch, tmp_path):
    """Every sandbox run of a test gets a unique directory prefix, which is also on the child's
    command line: afterwards neither a directory nor a process may carry it."""
    marker = f"braid-sbx-test-{uuid.uuid4().hex[:12]}-"
    monkeypatch.setattr(sandbox, "_WORKDIR_PREFIX", marker)
    yield marker
    assert not _marked(marker), "a sandboxed process outlived its run"
    leftovers = [p for p in Path(sandbox.tempfile.gettempdir()).iterdir() if marker in p.name]
    assert not leftovers, f"working directories left behind: {leftovers}"


def test_correct_solution_passes():
    r = run_code(ADD, "2 40\n")
    assert (r.status, r.returncode, r.stdout) == ("ok", 0, "42\n")
    assert CodeTests()(["add"], [f"```python\n{ADD}```"], tests=[ADD_TESTS]) == [1.0]


def test_infinite_loop_stopped_by_cpu_limit():
    t = time.monotonic()
    r = run_code("while True: pass", cpu_s=1, wall_s=20)
    assert r.status == "timeout" and time.monotonic() - t < 15  # the CPU limit, not wall
    assert CodeTests(cpu_s=1, wall_s=20)(["p"], ["while True: pass"], tests=[ADD_TESTS]) == [0.0]


def test_blocking_program_stopped_by_wall_limit():
    t = time.monotonic()
    r = run_code("import time\ntime.sleep(1000)", cpu_s=5, wall_s=1.5)
    assert r.status == "timeout" and 1.4 < r.wall_s < 15 and time.monotonic() - t < 20


@pytest.mark.parametrize("source", [
    "x = []\nwhile True:\n    x.append(bytearray(10**7))",
    "s = ' ' * (10**10)",
])
def test_unbounded_allocation_stopped(source):
    r = run_code(source, memory_mb=128, wall_s=10)
    assert r.status in ("memory", "error"), r
    assert CodeTests(memory_mb=128)(["p"], [source], tests=[ADD_TESTS]) == [0.0]


def test_fork_bomb_stopped_and_nothing_survives(leaves_nothing_behind):
    r = run_code("import os\nwhile True:\n    os.fork()", wall_s=5)
    assert r.status == "forbidden" and "os.fork" in r.stderr
    assert not _marked(leaves_nothing_behind)
    # the unaudited routes to fork are gone as well
    for src in ("import _posixsubprocess\n_posixsubprocess.fork_exec()",
                "import multiprocessing\nmultiprocessing.Process(target=print).start()",
                "import pty\npty.fork()", "import ctypes",
                "import importlib.util as u, _json\n"  # _ctypes loaded under another name
                "u.module_from_spec(u.spec_from_file_location("
                "'x._ctypes', _json.__file__.replace('_json', '_ctypes')))"):
        assert run_code(src).status == "forbidden", src


def test_subprocess_stopped_and_no_sleep_left():
    started = time.time()
    r = run_code("import subprocess\nsubprocess.run(['sleep', '987.6'])\nprint('ran')")
    assert r.status == "forbidden" and "ran" not in r.stdout
    for src in ("import os\nos.system('sleep 987.6')", "import os\nos.execvp('sleep', ['sleep'])",
                "import os\nos.posix_spawnp('sleep', ['sleep', '987.6'], {})"):
        assert run_code(src).status == "forbidden", src
    for p in psutil.process_iter(["cmdline", "create_time"]):
        assert not (p.info["cmdline"] == ["sleep", "987.6"]
                    and p.info["create_time"] >= started - 1), "a sleep escaped"


@pytest.mark.parametrize("how", [
    "open({p!r}, 'w').write('escaped')",
    "import os\nos.close(os.open({p!r}, os.O_WRONLY | os.O_CREAT))",
    "import pathlib\npathlib.Path({p!r}).write_text('escaped')",
    "import os\nos.mkdir({p!r})",
    "open('inside', 'w').close()\nimport os\nos.rename('inside', {p!r})",
    "import os\nos.chdir({p!r}.rsplit('/', 1)[0])\nopen({p!r}.rsplit('/', 1)[1], 'w')",
    "import os\nos.symlink({p!r}, 'link')\nopen('link', 'w').write('escaped')",
    "import shutil\nshutil.copy(__file__, {p!r})",
])
@pytest.mark.parametrize("where", ["tmp", "repo"])
def test_writes_outside_the_working_directory_fail(how, where):
    base = Path("/tmp") if where == "tmp" else ROOT
    target = base / f"braid-escape-{uuid.uuid4().hex}"
    try:
        r = run_code(how.format(p=str(target)))
        assert r.status == "forbidden", r
        assert not target.exists()
    finally:
        if target.is_dir():
            target.rmdir()
        elif target.exists():
            target.unlink()


def test_existing_files_outside_cannot_be_changed_or_read():
    victim = ROOT / "pyproject.toml"
    before = victim.read_bytes()
    for src in (f"import os\nos.remove({str(victim)!r})",
                f"open({str(victim)!r}, 'a').write('x')",
                f"import os\nos.chmod({str(victim)!r}, 0)",
                f"print(open({str(victim)!r}).read())"):  # e.g. a dataset with the answers
        r = run_code(src)
        assert r.status == "forbidden" and "braid" not in r.stdout, (src, r)
    assert victim.read_bytes() == before


def test_files_inside_the_working_directory_work():
    src = ("import os, tempfile\nos.mkdir('d')\nopen('d/f', 'w').write('hi')\n"
           "with tempfile.NamedTemporaryFile('w+') as t:\n    t.write('x')\n"
           "os.chmod('d', 0)\nprint(open('d/f').read() if os.getuid() == 0 else 'hi')")
    r = run_code(src)
    assert (r.status, r.stdout) == ("ok", "hi\n"), r
    for src in ("print(open(0).read().upper())", "print(open('/dev/stdin').read().upper())",
                "import sys\nprint(sys.stdin.read().upper(), file=open('/dev/stdout', 'w'))"):
        assert run_code(src, "abc").stdout == "ABC\n", src


def test_network_is_refused():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        for src in ("import socket\nsocket.socket()",
                    f"import socket\nsocket.create_connection(('127.0.0.1', {port})).send(b'hi')",
                    "import socket\nsocket.getaddrinfo('localhost', 80)",
                    "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:1')"):
            assert run_code(src).status == "forbidden", src
        with pytest.raises(TimeoutError):
            server.accept()  # nobody got through
    finally:
        server.close()


def test_private_network_namespace_when_available():
    if sandbox._netns_prefix(sys.executable) is None:
        pytest.skip("unshare --user --net is not available here")
    r = run_code("import socket\nprint(socket.if_nameindex())", isolate_net=True)
    assert (r.status, r.stdout) == ("ok", "[(1, 'lo')]\n")  # loopback only, and it is down


def test_output_flood_is_capped():
    t = time.monotonic()
    r = run_code("while True:\n    print('x' * 1000)", output_bytes=10_000, wall_s=10)
    assert r.status == "output_limit" and len(r.stdout) == 10_000
    assert time.monotonic() - t < 9  # the cap, not the wall limit, ended it
    r = run_code("import sys\nwhile True:\n    sys.stderr.write('e' * 1000)", output_bytes=10_000)
    assert r.status == "output_limit" and len(r.stderr) <= 4000


def test_stays_healthy_after_abuse():
    abuse = ["import os\nwhile True: os.fork()", "while True: print('x' * 1000)",
             "x = [bytearray(10**7) for _ in range(10**6)]", "import socket\nsocket.socket()",
             "import os\nos.kill(os.getppid(), 9)", "import sys\nsys.exit(3)", "(", "1/0"]
    statuses = [run_code(src, memory_mb=128, output_bytes=10_000).status for src in abuse]
    assert statuses == ["forbidden", "output_limit", "memory", "forbidden", "forbidden",
                        "error", "error", "error"]
    assert run_code(ADD, "1 1\n").stdout == "2\n"
    verify = CodeTests(cpu_s=1, wall_s=3)
    assert verify(["p"] * 2, [ADD, "print(5)"], tests=[ADD_TESTS] * 2) == [1.0, 0.5]


def test_internal_failure_is_unscored():
    r = run_code("print(1)", python="/nonexistent/python")
    assert r.status == "internal"

    class Broken(CodeTests):
        def __init__(self):
            super().__init__()
            self.limits["python"] = "/nonexistent/python"

    assert Broken()(["p"], [ADD], tests=[ADD_TESTS]) == [None]


def test_code_tests_inputs():
    verify = CodeTests(cpu_s=1, wall_s=3)
    text = "Plan first.\n```python\nprint(1)\n```\nFinal:\n```python\n" + ADD + "```\nDone."
    json_tests = '[{"input": "2 3\\n", "output": "5"}]'  # trailing newline ignored
    apps_tests = {"inputs": ["2 3\n", "1 1\n"], "outputs": ["5\n", "3\n"]}
    got = verify(["p"] * 5, [text, text, text, "", None],
                 tests=[json_tests, apps_tests, "garbage", ADD_TESTS, ADD_TESTS])
    assert got == [1.0, 0.5, None, 0.0, None]


def test_code_tests_through_the_reward_worker():
    """Driven like the reward role does it: verifiers in a forked daemonic pool child."""
    from workers.base import WorkerContext
    from workers.reward import RuleRewardWorker
    from workers.types import Rollouts

    args = RuleRewardWorker.check_args(
        {"verifiers": [{"fn": "rewards.sandbox:CodeTests", "args": {"cpu_s": 1, "wall_s": 3}}],
         "timeout_s": 60}, "roles.reward.args")
    w = RuleRewardWorker(WorkerContext("reward", 0, 1, None, args))
    w.setup()
    try:
        texts = ["```python\nwhile True:\n    pass\n```", f"```python\n{ADD}```",
                 "```python\nimport os\nos.fork()\n```"]
        n = len(texts)
        rollouts = Rollouts(list(range(n)), [[1]] * n, [[5]] * n, [[-0.1]] * n, texts,
                            ["stop"] * n)
        records = [{"id": f"c{i}", "prompt": "add two numbers", "tests": ADD_TESTS}
                   for i in range(n)]
        s = w.score(rollouts, records)
        assert s.per_verifier["CodeTests"] == [0.0, 1.0, 0.0]
        assert s.rewards == [0.0, 1.0, 0.0] and not s.failures and not s.failed_ids
    finally:
        w.shutdown()
