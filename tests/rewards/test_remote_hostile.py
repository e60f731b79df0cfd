"""The reward server under heavy and hostile use (issue 31), each check against a real
``braid serve-reward`` process on 127.0.0.1: auth that cannot be switched off by accident, 200
concurrent clients without resets, idle and slow connections closed, caller errors as 4xx
that name what was wrong (and are not retried), and a hung verifier that starves only itself.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from rewards.remote import RemoteVerifier, RemoteVerifierError

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

VERIFIERS = '''
import time

def echo(prompts, completions, **_):
    """Each completion read as a number."""
    return [float(c) for c in completions]

def needs_answer(prompts, completions, answer):
    open("needs_answer.called", "w").close()
    return [float(c == a) for c, a in zip(completions, answer)]

def hang(prompts, completions, **_):
    time.sleep(60)
    return [0.0] * len(completions)

def explode(prompts, completions, **_):
    raise ValueError("cannot read /srv/team/secret_config.yaml\\nsecond line of the message")
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(token: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "BRAID_REWARD_TOKEN"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if token is not None:
        env["BRAID_REWARD_TOKEN"] = token
    return env


class Server:
    """A ``braid serve-reward`` process serving the verifiers above from ``folder``."""

    def __init__(self, folder: Path, *args: str, token: str | None = TOKEN):
        (folder / "team.py").write_text(VERIFIERS)
        self.folder, self.port = folder, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / f"serve-{self.port}.log"
        cmd = [sys.executable, "-m", "orchestrator.cli", "serve-reward", "team:echo",
               "team:needs_answer", "team:hang", "team:explode", "--port", str(self.port),
               *args]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=folder, env=_env(token), stdout=out,
                                         stderr=subprocess.STDOUT)
        self._wait_up()

    def _wait_up(self):
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1):
                    return
            except OSError:
                assert self.proc.poll() is None, self.log.read_text()
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.1)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def request(self, method, path, body=None, headers=AUTH, timeout=10):
        """(status, parsed JSON answer, headers) of one request on a fresh connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read()), dict(resp.headers)
        finally:
            conn.close()

    def raw(self, data: bytes) -> socket.socket:
        """A connection that has sent ``data`` as is."""
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        s.sendall(data)
        return s


@pytest.fixture
def launch(tmp_path):
    servers = []

    def make(*args, token=TOKEN):
        servers.append(Server(tmp_path, *args, token=token))
        return servers[-1]

    yield make
    for srv in servers:
        srv.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("served"), "--timeout-s", "0.5",
                 "--max-concurrency", "2", "--idle-timeout-s", "1", "--request-timeout-s", "1")
    yield srv
    srv.stop()


def _answer_of(sock: socket.socket, within: float) -> bytes:
    """What the server sends on ``sock`` until it closes it; fails if still open after
    ``within`` seconds."""
    sock.settimeout(within)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for {within}s; sent {data[:100]!r}")
    return data


def _log_count(srv: Server, line: str, settle: float) -> int:
    """How often ``line`` is in the server's log once it has stopped growing for ``settle`` s
    (the server logs a request just after answering it)."""
    last, deadline = -1, time.monotonic() + 10
    while time.monotonic() < deadline:
        n = srv.log.read_text().count(line)
        if n == last:
            return n
        last = n
        time.sleep(settle)
    return last


# ---------------------------------------------------------------------------------------------
# 1. auth


def test_an_empty_or_unset_token_refuses_to_start(tmp_path):
    (tmp_path / "team.py").write_text(VERIFIERS)
    base = [sys.executable, "-m", "orchestrator.cli", "serve-reward", "team:echo", "--port", "0"]
    for token, extra in ((None, []), ("", []), ("  ", []), (None, ["--host", "0.0.0.0",
                                                                   "--no-auth"])):
        proc = subprocess.run(base + extra, cwd=tmp_path, env=_env(token), capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        if "--host" in extra:
            assert "--no-auth on 0.0.0.0" in proc.stderr and "--insecure-network" in proc.stderr
        else:
            assert "no token" in proc.stderr and "$BRAID_REWARD_TOKEN" in proc.stderr
            assert "--token-file" in proc.stderr and "--no-auth" in proc.stderr
    (tmp_path / "empty").write_text("\n")
    proc = subprocess.run(base + ["--token-file", str(tmp_path / "empty")], cwd=tmp_path,
                          env=_env(None), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no token (--token-file" in proc.stderr


def test_token_from_the_environment_or_a_file_never_on_the_command_line(launch, tmp_path):
    body = {"prompts": ["p"], "completions": ["3"]}
    (tmp_path / "token").write_text(TOKEN + "\n")
    for srv in (launch(), launch("--token-file", str(tmp_path / "token"), token=None)):
        cmdline = Path(f"/proc/{srv.proc.pid}/cmdline").read_bytes()
        assert TOKEN.encode() not in cmdline  # what `ps` would show
        assert srv.request("POST", "/score/echo", body, headers={})[0] == 401
        assert srv.request("POST", "/score/echo", body)[:2] == (200, {"rewards": [3.0]})
    # without auth only when asked for, on loopback
    srv = launch("--no-auth", token=None)
    assert srv.request("POST", "/score/echo", body, headers={})[0] == 200
    assert "serving WITHOUT authentication" in srv.log.read_text()


# ---------------------------------------------------------------------------------------------
# 2. load


def test_200_concurrent_requests_are_all_answered(launch):
    srv = launch()
    n = 200
    start, results = threading.Barrier(n), [None] * n

    def client(i):
        start.wait()
        try:
            results[i] = srv.request("POST", "/score/echo",
                                     {"prompts": ["p"], "completions": [str(i)]}, timeout=60)[:2]
        except OSError as err:  # a reset, a refused connection
            results[i] = repr(err)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    wrong = [(i, r) for i, r in enumerate(results) if r != (200, {"rewards": [float(i)]})]
    assert not wrong, f"{len(wrong)} of {n} not answered: {wrong[:5]}"


def test_idle_connections_are_closed_and_connections_capped(launch):
    srv = launch("--idle-timeout-s", "0.5", "--max-connections", "6")
    idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(6)]
    body = {"prompts": ["p"], "completions": ["1"]}
    status, ans, _ = srv.request("POST", "/score/echo", body)
    assert status == 503  # over the cap: refused, not queued behind the idle ones
    t0 = time.monotonic()
    assert all(_answer_of(s, within=3) == b"" for s in idle)  # closed by the server
    assert time.monotonic() - t0 < 2.5
    # a client sending its headers a byte at a time is closed too
    slow = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    t0 = time.monotonic()
    for b in b"POST /score/echo HTTP/1.1\r\n":
        try:
            slow.send(bytes([b]))
        except OSError:
            break
        time.sleep(0.05)
    assert _answer_of(slow, within=3) == b"" and time.monotonic() - t0 < 3
    assert srv.request("POST", "/score/echo", body)[0] == 200
    for s in [*idle, slow]:
        s.close()


def test_a_bad_token_is_refused_right_after_the_headers(server):
    head = (b"POST /score/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer wrong\r\nContent-Length: 1000000\r\n\r\n")
    sock = server.raw(head)  # the body never comes
    t0 = time.monotonic()
    sock.settimeout(5)
    first = sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 401") and time.monotonic() - t0 < 1.0
    rest = _answer_of(sock, within=4)  # and the connection is not kept for the body
    assert b"bearer token" in first + rest and time.monotonic() - t0 < 3.0
    sock.close()


def test_every_request_has_a_deadline(server):
    head = (b"POST /score/echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
            + b"\r\nContent-Length: 100\r\n\r\n{\"prompts\": ")  # then stalls
    sock = server.raw(head)
    t0 = time.monotonic()
    answer = _answer_of(sock, within=5)
    assert answer.startswith(b"HTTP/1.1 408") and b"request deadline of 1s" in answer
    assert time.monotonic() - t0 < 3.0
    sock.close()


# ---------------------------------------------------------------------------------------------
# 3. caller errors are 4xx, name what was wrong, and are not retried


def test_a_missing_field_is_400_naming_it_before_the_call(server):
    status, ans, _ = server.request("POST", "/score/needs_answer",
                                    {"prompts": ["p"], "completions": ["1"]})
    assert status == 400
    assert "verifier 'needs_answer'" in ans["error"] and "'answer'" in ans["error"]
    assert not (server.folder / "needs_answer.called").exists()
    # the client raises at once instead of retrying
    remote = RemoteVerifier(server.url, "needs_answer", token=TOKEN, retries=3, backoff_s=1)
    t0 = time.monotonic()
    with pytest.raises(RemoteVerifierError, match=r"HTTP 400: verifier 'needs_answer'.*'answer'"):
        remote(["p"], ["1"], other=["x"])
    assert time.monotonic() - t0 < 1.0  # no backoff: one attempt
    assert _log_count(server, '"POST /score/needs_answer" 400', settle=0.5) == 2
    assert remote(["p", "p"], ["1", "2"], answer=["1", "1"]) == [1.0, 0.0]


def test_json_nested_too_deep_is_400(server):
    depth = 100_000
    body = b'{"prompts": ' + b"[" * depth + b"]" * depth + b', "completions": []}'
    status, ans, _ = server.request("POST", "/score/echo", body)
    assert status == 400 and "nested too deep" in ans["error"]


def test_a_wrong_method_is_405_json(server):
    for method in ("PUT", "DELETE", "GET"):
        status, ans, headers = server.request(method, "/score/echo", b"{}")
        assert status == 405 and f"takes POST, not {method}" in ans["error"]
        assert headers["Allow"] == "POST"
    status, ans, _ = server.request("POST", "/verifiers", b"{}")
    assert status == 405 and "takes GET" in ans["error"]


@pytest.mark.parametrize("framing", [
    b"Content-Length: 5\r\nTransfer-Encoding: chunked",
    b"Content-Length: 5\r\nContent-Length: 6",
    b"Content-Length: 5, 6",
    b"Content-Length: +5",
    b"Content-Length: 0x5",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
])
def test_ambiguous_framing_is_400(server, framing):
    sock = server.raw(b"POST /score/echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                      + TOKEN.encode() + b"\r\n" + framing + b"\r\n\r\n5\r\n{}{}{\r\n0\r\n\r\n")
    answer = _answer_of(sock, within=5)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    body = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert "framing" in body["error"] or "malformed HTTP request" in body["error"]


# ---------------------------------------------------------------------------------------------
# 4. isolation


def test_a_hung_verifier_starves_only_itself_and_health_says_so(launch):
    srv = launch("--timeout-s", "0.3", "--max-concurrency", "2", "--queue-timeout-s", "0.1")
    body = {"prompts": ["p"], "completions": ["1"]}
    assert srv.request("GET", "/health", headers={})[1]["status"] == "ok"
    for _ in range(2):  # both of hang's slots stay held past the timeout
        status, ans, _ = srv.request("POST", "/score/hang", body)
        assert status == 504 and "ran past 0.3s" in ans["error"]
    status, ans, _ = srv.request("POST", "/score/hang", body)
    assert status == 503 and "slots of verifier 'hang'" in ans["error"]
    assert srv.request("POST", "/score/echo", body)[:2] == (200, {"rewards": [1.0]})
    health = srv.request("GET", "/health", headers={})[1]
    assert health["status"] == "degraded" and health["in_flight"] == 2
    assert health["slots"]["hang"] == {"status": "saturated", "in_flight": 2, "overdue": 2,
                                       "timed_out": 2}
    assert health["slots"]["echo"]["status"] == "ok"


def test_a_raising_verifier_is_a_one_line_500_with_the_traceback_in_the_log(server):
    status, ans, _ = server.request("POST", "/score/explode", {"prompts": ["p"],
                                                               "completions": ["1"]})
    assert status == 500
    assert ans["error"] == ("verifier 'explode' raised ValueError: cannot read "
                            "/srv/team/secret_config.yaml")
    log = server.log.read_text()
    assert "Traceback (most recent call last)" in log and "second line of the message" in log
    assert 'team.py", line' in log
