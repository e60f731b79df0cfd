"""A code-execution sandbox for rewards: run a completion's Python program on test inputs.

``run_code(source, stdin)`` runs ``source`` in a fresh interpreter and returns a
:class:`RunResult`; ``CodeTests`` is the verifier built on it (stdin/stdout test cases).

What it enforces, and how:

- **Interpreter**: ``python -I -S -B -X utf8`` (the reward process's own interpreter unless
  ``python=`` says otherwise): isolated mode, no ``site`` (so the standard library only, no
  site-packages), no bytecode writing, no ``PYTHON*`` environment variables.
- **Resource limits**, set by the child before the program starts (``rewards/_sandbox_child.py``):
  ``RLIMIT_CPU`` (``cpu_s`` rounded up to whole seconds; SIGXCPU, then SIGKILL a second later),
  ``RLIMIT_AS`` (``memory_mb``: allocations fail with ``MemoryError``), ``RLIMIT_FSIZE``
  (``file_mb`` per file), ``RLIMIT_NOFILE`` (64), no core dumps, and ``RLIMIT_NPROC`` only when
  ``max_processes`` is given: it counts every process and thread of the *uid*, is ignored for
  root, and 0 also forbids threads, so it is opt-in (meaningful with a dedicated sandbox uid).
- **Wall time** from the parent: the child runs in its own session (process group) and the
  whole group is SIGKILLed at ``wall_s``; the child also ends itself at ``wall_s + 1`` (a watchdog
  thread) should the parent die first. The group is always killed before the child is reaped,
  so nothing of the run outlives it and no recycled pid is ever signalled.
- **Output**: stdout and stderr are read incrementally; past ``output_bytes`` on either, the
  group is killed (status ``output_limit``). Nothing is buffered beyond the cap.
- **Audit hooks** (PEP 578), installed before the program runs and impossible to remove from
  Python: process creation (``os.fork``, ``os.exec*``, ``os.posix_spawn``, ``os.system``,
  ``subprocess.Popen``, ``pty``), signalling (``os.kill``, ``os.killpg``), every ``socket.*``
  operation (creation, connect, bind, DNS lookups), ``ctypes``, ``resource.setrlimit``,
  tracing/profiling and ``gc`` object walking are *fatal*: the process exits at once with status
  ``forbidden`` (the program cannot catch it and retry). Files may be written, created, renamed,
  removed or chmodded only inside the working directory (symlinks resolved; links cannot be
  made); files may be read only there, in the standard library and from ``/dev/{null,zero,
  urandom,random}``, so a program cannot read the dataset (or the answers) off the disk. The
  path an audit event reports must be ``str``/``bytes`` (``open(Path(...))`` is fine, ``os``
  functions given a path-like object are refused: a custom ``__fspath__`` could show the hook one
  path and the kernel another). A few unaudited functions (``pidfd_open``,
  ``pidfd_send_signal``, ``mknod``, ``mkfifo``, ``chroot``) are deleted from their modules and
  ``_posixsubprocess.fork_exec`` (``subprocess``'s unaudited fork) is replaced by a refusal.
- **Filesystem and environment**: a fresh ``tempfile.mkdtemp()`` working directory (also
  ``HOME`` and ``TMPDIR``), removed afterwards; a minimal environment (no proxies, no tokens).
- **Network namespace**, when ``unshare --user --map-root-user --net`` works without privileges
  (probed once; ``isolate_net=None``): the program has only a loopback that is down. Not
  depended on: the audit hook already refuses sockets.

What it does **not** protect against: it is defence in depth for reward computation, not a
security boundary against a determined attacker. Audit hooks run inside the attacked
interpreter: a bug in CPython or a C extension of the standard library, an unaudited primitive
we did not think of, or memory corruption gets past them. There is no seccomp filter, no
mount or pid namespace and no cgroup: limits are per process, and a process that did get
forked could ``setsid()`` out of the group kill; running as root, file permissions do not
help either. A program can still burn its CPU and wall budget, fill its working directory (file
size is limited, file count is not) and read the standard library. Run the reward role in its own
container (unprivileged user, read-only root filesystem, no network, memory/pid cgroup
limits) when the completions come from a model you would not trust with a shell.
"""

from __future__ import annotations

import json
import math
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from rewards._sandbox_child import FORBIDDEN, MEMORY, WALL

_CHILD_SOURCE = (Path(__file__).with_name("_sandbox_child.py")).read_text(encoding="utf-8")
_WORKDIR_PREFIX = "braid-sbx-"
_STDERR_KEEP = 4000


@dataclass(frozen=True)
class RunResult:
    """How a program ended.

    ``status``: ``ok`` (exit 0), ``error`` (non-zero exit, e.g. an exception), ``timeout`` (CPU
    or wall limit), ``memory`` (``MemoryError``), ``output_limit``, ``forbidden`` (a blocked
    operation), ``killed`` (another signal, e.g. the hard CPU limit's SIGKILL) or ``internal``
    (the sandbox itself failed: the program was not judged).
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str  # the last few thousand characters
    wall_s: float

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@cache
def _netns_prefix(python: str) -> tuple[str, ...] | None:
    """``unshare`` arguments for a private network namespace, if that works unprivileged."""
    exe = shutil.which("unshare")
    if exe is None:
        return None
    prefix = (exe, "--user", "--map-root-user", "--net")
    try:
        done = subprocess.run([*prefix, python, "-I", "-S", "-c", ""], capture_output=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return prefix if done.returncode == 0 else None


def run_code(source: str, stdin: str = "", *, cpu_s: float = 2, wall_s: float = 5,
             memory_mb: int = 256, output_bytes: int = 64_000, file_mb: int = 16,
             max_processes: int | None = None, isolate_net: bool | None = None,
             python: str | None = None) -> RunResult:
    """Run ``source`` as a Python program with ``stdin``, under the limits above.

    ``isolate_net``: None uses a network namespace when available, True requires one (status
    ``internal`` without), False never uses one.

    >>> r = run_code("print(sum(map(int, input().split())))", "2 40\\n")
    >>> r.status, r.stdout
    ('ok', '42\\n')
    >>> run_code("import os; os.system('echo hi')").status
    'forbidden'
    >>> run_code("while True: pass", cpu_s=1).status
    'timeout'
    """
    start = time.monotonic()
    python = python or sys.executable
    prefix: tuple[str, ...] = ()
    if isolate_net is not False:
        prefix = _netns_prefix(python) or ()
        if isolate_net and not prefix:
            return RunResult("internal", None, "", "no network namespace available", 0.0)
    workdir = tempfile.mkdtemp(prefix=_WORKDIR_PREFIX)
    try:
        Path(workdir, "main.py").write_text(source, encoding="utf-8", errors="surrogatepass")
        cfg = {"workdir": workdir, "main": "main.py", "cpu_s": max(1, math.ceil(cpu_s)),
               "wall_s": wall_s, "memory_bytes": int(memory_mb * 2**20),
               "file_bytes": int(file_mb * 2**20), "max_processes": max_processes}
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
               "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        cmd = [*prefix, python, "-I", "-S", "-B", "-X", "utf8", "-c", _CHILD_SOURCE,
               json.dumps(cfg)]
        with tempfile.TemporaryFile(dir=workdir) as stdin_file:
            stdin_file.write(stdin.encode("utf-8", "surrogateescape"))
            stdin_file.seek(0)
            proc = subprocess.Popen(cmd, stdin=stdin_file, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, cwd=workdir, env=env,
                                    start_new_session=True)
        return _supervise(proc, start, wall_s, output_bytes, bool(prefix))
    except (OSError, ValueError, UnicodeError) as err:
        return RunResult("internal", None, "", f"{type(err).__name__}: {err}",
                         time.monotonic() - start)
    finally:
        _remove_tree(workdir)


def _supervise(proc: subprocess.Popen, start: float, wall_s: float, cap: int,
               wrapped: bool) -> RunResult:
    deadline = start + wall_s
    buffers = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    verdict = None  # set when we stop the program ourselves
    with selectors.DefaultSelector() as sel:
        for pipe in buffers:
            sel.register(pipe, selectors.EVENT_READ)
        while sel.get_map() and verdict is None:
            left = deadline - time.monotonic()
            if left <= 0:
                verdict = "timeout"
                break
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = buffers[key.fileobj]
                buf += chunk[: cap + 1 - len(buf)]
                if len(buf) > cap:
                    verdict = "output_limit"
    if verdict is None and not _exited(proc.pid, deadline):
        verdict = "timeout"
    try:  # the whole group, while the (possibly zombie) leader still holds its pid
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    rc = proc.wait()
    for pipe in buffers:
        pipe.close()
    wall = time.monotonic() - start
    out = bytes(buffers[proc.stdout][:cap]).decode("utf-8", "replace")
    err = bytes(buffers[proc.stderr][-_STDERR_KEEP:]).decode("utf-8", "replace")
    if verdict is None:
        if wrapped and rc == 1 and err.startswith("unshare:"):
            verdict = "internal"
        else:
            verdict = {0: "ok", FORBIDDEN: "forbidden", MEMORY: "memory", WALL: "timeout",
                       -signal.SIGXCPU: "timeout"}.get(rc, "killed" if rc < 0 else "error")
    return RunResult(verdict, rc, out, err, wall)


def _exited(pid: int, deadline: float) -> bool:
    """Wait (not reaping) until ``pid`` has exited or the deadline passes."""
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def _remove_tree(path: str) -> None:
    """Remove the working directory, even where the program took permissions away."""
    try:
        os.chmod(path, 0o700)
        for root, dirs, _ in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o700, follow_symlinks=False)
    except OSError:
        pass
    shutil.rmtree(path, ignore_errors=True)


_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.S)


def extract_code(text: str) -> str:
    """The program in a completion: the last ```python block, else the last unlabelled
    fenced block, else the whole text (after any ``</think>``).

    >>> extract_code("Here:\\n```python\\nprint(1)\\n```\\nDone.")
    'print(1)\\n'
    >>> extract_code("print(2)")
    'print(2)'
    """
    if not isinstance(text, str):
        return ""
    text = text.rpartition("</think>")[2]
    blocks = _FENCE.findall(text)
    for wanted in (("python", "py", "python3"), ("",)):
        found = [code for lang, code in blocks if lang.lower() in wanted]
        if found:
            return found[-1]
    return text


def _cases(tests) -> list[tuple[str, str]] | None:
    """``[{"input", "output"}, ...]`` (or its JSON, or ``{"inputs": [...], "outputs": [...]}``)
    as (stdin, expected stdout) pairs; None when unusable."""
    try:
        if isinstance(tests, str):
            tests = json.loads(tests)
        if isinstance(tests, dict):
            tests = [{"input": i, "output": o} for i, o in zip(tests["inputs"], tests["outputs"])]
        pairs = [(t["input"], t["output"]) for t in tests]
    except (TypeError, KeyError, ValueError):
        return None
    ok = pairs and all(isinstance(i, str) and isinstance(o, str) for i, o in pairs)
    return pairs if ok else None


def _same_output(got: str, want: str) -> bool:
    """Equal up to trailing whitespace on each line and trailing blank lines."""
    def norm(s: str) -> list[str]:
        return [line.rstrip() for line in s.rstrip().splitlines()]
    return norm(got) == norm(want)


class CodeTests:
    """Verifier factory: run each completion's program on its record's ``tests`` (stdin/stdout
    cases) and score the **fraction of cases passed**.

    A case the program fails for any reason of its own (wrong output, exception, timeout,
    memory, output flood, forbidden operation) counts as failed: the completion is wrong, not
    unscorable. A sample is ``None`` only when its tests are unusable or the sandbox itself
    failed on one of its cases. Cases run ``parallel`` at a time, in threads (each case is a
    separate process), so size the reward worker's ``timeout_s`` for
    ``ceil(samples * cases / parallel) * wall_s`` at worst.

    Recipe: ``{fn: "rewards.sandbox:CodeTests", args: {cpu_s: 2, wall_s: 5}}``.

    >>> verify = CodeTests(cpu_s=1, wall_s=3)
    >>> tests = [{"input": "2 3\\n", "output": "5\\n"}, {"input": "1 1\\n", "output": "2\\n"}]
    >>> good = "```python\\na, b = map(int, input().split())\\nprint(a + b)\\n```"
    >>> verify(["add"] * 3, [good, "print(5)", "while True: pass"], tests=[tests] * 3)
    [1.0, 0.5, 0.0]
    """

    def __init__(self, cpu_s: float = 2, wall_s: float = 5, memory_mb: int = 256,
                 output_bytes: int = 64_000, file_mb: int = 16, parallel: int | None = None,
                 max_processes: int | None = None, isolate_net: bool | None = None):
        self.limits = dict(cpu_s=cpu_s, wall_s=wall_s, memory_mb=memory_mb,
                           output_bytes=output_bytes, file_mb=file_mb,
                           max_processes=max_processes, isolate_net=isolate_net)
        self.parallel = parallel or min(4, os.cpu_count() or 1)

    def _case(self, code: str, stdin: str, want: str) -> float | None:
        result = run_code(code, stdin, **self.limits)
        if result.status == "internal":
            return None
        return 1.0 if result.ok and _same_output(result.stdout, want) else 0.0

    def __call__(self, prompts, completions, tests=None, **_) -> list[float | None]:
        n = len(completions)
        tests = list(tests) if tests is not None else []
        cases = [_cases(tests[i]) if i < len(tests) else None for i in range(n)]
        codes = [extract_code(c) if isinstance(c, str) else None for c in completions]
        jobs = [(i, code, stdin, want) for i, (code, pairs) in enumerate(zip(codes, cases))
                if code and code.strip() and pairs for stdin, want in pairs]
        with ThreadPoolExecutor(self.parallel) as pool:
            results = list(pool.map(lambda job: self._case(*job[1:]), jobs))
        per_sample: dict[int, list[float | None]] = {}
        for (i, *_rest), r in zip(jobs, results):
            per_sample.setdefault(i, []).append(r)
        out: list[float | None] = []
        for i in range(n):
            if codes[i] is None or cases[i] is None:
                out.append(None)
            elif i not in per_sample:  # no program at all
                out.append(0.0)
            else:
                r = per_sample[i]
                out.append(None if None in r else sum(r) / len(r))
        return out
