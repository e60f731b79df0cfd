"""Remote verifiers against a real server on 127.0.0.1: round trips, failures that score None
without taking the server down, retries, bounded concurrency, auth, the CLI and the reward
worker."""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rewards.arithmetic import exact_answer
from rewards.remote import RemoteVerifier, RemoteVerifierError, serve

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_env_token(monkeypatch):
    monkeypatch.delenv("BRAID_REWARD_TOKEN", raising=False)


@pytest.fixture
def start():
    """start(verifiers, **server_kwargs) -> a running server; all stopped at teardown, and
    `release` (an Event hanging verifiers wait on) set so their threads end."""
    servers = []
    release = threading.Event()

    def make(verifiers, **kw):
        srv = serve(verifiers, port=0, **kw)
        servers.append(srv)
        return srv

    make.release = release
    yield make
    release.set()
    for srv in servers:
        srv.shutdown()


def raw(url, method, path, body=None, headers=None):
    """One request with an arbitrary body: (status, parsed JSON answer, headers)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=headers or {})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read()), dict(resp.headers)
    conn.close()
    return out


def test_round_trip_matches_a_local_call(start):
    srv = start({"exact_answer": exact_answer})
    prompts = [f"{i}+{i}=" for i in range(7)]
    completions = ["0", "2", "9", "6", "8", "01", "21"]
    fields = {"answer": [str(2 * i) for i in range(7)],
              "reverse": [False] * 5 + [True, True]}
    local = exact_answer(prompts, completions, **fields)
    assert local == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    remote = RemoteVerifier(srv.url, "exact_answer", batch_size=3)  # 3 chunks
    assert remote(prompts, completions, **fields) == local
    assert RemoteVerifier(srv.url + "/score/exact_answer")(prompts, completions, **fields) == local
    assert remote([], []) == []
    status, health, _ = raw(srv.url, "GET", "/health")
    assert status == 200 and health["verifiers"] == ["exact_answer"]
    status, listing, _ = raw(srv.url, "GET", "/verifiers")
    assert listing["verifiers"][0]["name"] == "exact_answer"
    assert listing["verifiers"][0]["doc"].startswith("1.0 when")


def test_bad_requests_get_clear_4xx(start):
    srv = start({"exact_answer": exact_answer}, max_body_bytes=2000)
    post = lambda body: raw(srv.url, "POST", "/score/exact_answer", body)  # noqa: E731
    status, ans, _ = post({"prompts": ["a"], "completions": ["1", "2"]})
    assert status == 400 and "'prompts' has 1 items but 'completions' has 2" in ans["error"]
    status, ans, _ = post({"prompts": ["a"], "completions": ["1"], "fields": {"answer": []}})
    assert status == 400 and "field 'answer' must be a list of 1" in ans["error"]
    status, ans, _ = post({"prompts": ["a"], "completions": [1]})
    assert status == 400 and "'completions' must be a list of strings" in ans["error"]
    assert post(b"{not json")[0] == 400
    assert post({"prompts": [], "completions": [], "extra": 1})[0] == 400
    status, ans, _ = post({"prompts": ["a"] * 300, "completions": ["1"] * 300})
    assert status == 413 and "limit of 2000" in ans["error"]
    assert raw(srv.url, "GET", "/score/exact_answer")[0] == 405
    assert raw(srv.url, "GET", "/nowhere")[0] == 404
    assert raw(srv.url, "GET", "/health")[0] == 200  # still up


def test_raising_verifier_is_500_and_none_and_the_server_stays_up(start, caplog):
    def picky(prompts, completions, **_):
        if "boom" in completions:
            raise ValueError("cannot parse boom")
        return [1.0] * len(completions)

    srv = start({"picky": picky})
    status, ans, _ = raw(srv.url, "POST", "/score/picky",
                         {"prompts": ["p"], "completions": ["boom"]})
    assert status == 500 and "ValueError: cannot parse boom" in ans["error"]
    remote = RemoteVerifier(srv.url, "picky", batch_size=1, retries=1, backoff_s=0.01)
    with caplog.at_level(logging.WARNING, "braid.reward.remote"):
        assert remote(["p"] * 3, ["ok", "boom", "ok"]) == [1.0, None, 1.0]
    assert "samples 1-1 scored None after 2 attempt(s)" in caplog.text
    assert "HTTP 500" in caplog.text and "cannot parse boom" in caplog.text
    assert remote(["p"], ["ok"]) == [1.0]


def test_hanging_verifier_times_out_and_the_client_time_is_bounded(start):
    def hang(prompts, completions, **_):
        start.release.wait(30)
        return [1.0] * len(completions)

    srv = start({"hang": hang}, timeout_s=0.3)
    status, ans, _ = raw(srv.url, "POST", "/score/hang", {"prompts": ["p"], "completions": ["c"]})
    assert status == 504 and "ran past 0.3s" in ans["error"]
    # server-side timeout: 504, retried once, then None
    remote = RemoteVerifier(srv.url, "hang", timeout_s=2, retries=1, backoff_s=0.05)
    t0 = time.monotonic()
    assert remote(["p"], ["c"]) == [None]
    assert time.monotonic() - t0 < 3.5  # 2 x 0.3 s + backoff, not 2 x the client's 2 s
    # client-side timeout: the server would wait 10 s, the client gives up after 0.3 s per try
    slow = start({"hang": hang}, timeout_s=10)
    remote = RemoteVerifier(slow.url, "hang", timeout_s=0.3, retries=2, backoff_s=0.05)
    t0 = time.monotonic()
    assert remote(["p"] * 2, ["c"] * 2) == [None, None]
    assert time.monotonic() - t0 < 8.0  # 3 x 0.3 s + backoff; the server would take 10 s
    # a deadline caps a call's total time below timeout x attempts
    remote = RemoteVerifier(slow.url, "hang", timeout_s=5, retries=3, deadline_s=0.4)
    t0 = time.monotonic()
    assert remote(["p"], ["c"]) == [None]
    assert time.monotonic() - t0 < 4.0  # without the deadline: over 5 s


def test_saturated_server_answers_503(start):
    entered = threading.Event()

    def hang(prompts, completions, **_):
        entered.set()
        start.release.wait(30)
        return [1.0] * len(completions)

    srv = start({"hang": hang}, timeout_s=5, max_concurrency=1, queue_timeout_s=0.05)
    body = {"prompts": ["p"], "completions": ["c"]}
    first = threading.Thread(target=raw, args=(srv.url, "POST", "/score/hang", body), daemon=True)
    first.start()
    assert entered.wait(5)
    status, ans, headers = raw(srv.url, "POST", "/score/hang", body)
    assert status == 503 and "busy" in ans["error"] and headers["Retry-After"] == "1"
    assert raw(srv.url, "GET", "/health")[1]["in_flight"] == 1
    start.release.set()
    first.join(5)
    assert raw(srv.url, "POST", "/score/hang", body)[0] == 200


def test_flaky_verifier_succeeds_after_retries(start, caplog):
    hits = []

    def flaky(prompts, completions, **_):
        hits.append(1)
        if len(hits) <= 2:
            raise RuntimeError(f"transient failure {len(hits)}")
        return [0.5] * len(completions)

    srv = start({"flaky": flaky})
    remote = RemoteVerifier(srv.url, "flaky", retries=3, backoff_s=0.01)
    assert remote(["p", "q"], ["a", "b"]) == [0.5, 0.5]
    assert len(hits) == 3
    # with fewer retries than failures the chunk scores None, with a warning
    hits.clear()
    with caplog.at_level(logging.WARNING, "braid.reward.remote"):
        assert RemoteVerifier(srv.url, "flaky", retries=1, backoff_s=0.01)(["p"], ["a"]) == [None]
    assert len(hits) == 2 and "transient failure 2" in caplog.text


def test_client_bounds_requests_in_flight(start):
    lock = threading.Lock()
    active, peak, calls = [0], [0], []

    def counted(prompts, completions, **_):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            calls.append(len(completions))
        time.sleep(0.1)
        with lock:
            active[0] -= 1
        return [float(c) for c in completions]

    srv = start({"counted": counted}, max_concurrency=8)
    remote = RemoteVerifier(srv.url, "counted", max_concurrency=2, batch_size=1)
    completions = [str(i) for i in range(6)]
    assert remote(["p"] * 6, completions) == [float(i) for i in range(6)]  # order kept
    assert calls == [1] * 6 and peak[0] == 2


def test_unknown_verifier_raises_naming_it(start):
    srv = start({"exact_answer": exact_answer})
    remote = RemoteVerifier(srv.url, "exact_anser", retries=3)
    with pytest.raises(RemoteVerifierError, match=r"score/exact_anser answered HTTP 404: "
                                                  r"no verifier named 'exact_anser'"):
        remote(["p"], ["1"], answer=["1"])


def test_token_auth(start):
    srv = start({"exact_answer": exact_answer}, token="s3cret")
    body = {"prompts": ["1+1="], "completions": ["2"], "fields": {"answer": ["2"]}}
    status, ans, headers = raw(srv.url, "POST", "/score/exact_answer", body)
    assert status == 401 and "bearer token" in ans["error"]
    assert headers["WWW-Authenticate"] == "Bearer"
    assert raw(srv.url, "GET", "/verifiers")[0] == 401
    assert raw(srv.url, "GET", "/health")[0] == 200
    with pytest.raises(RemoteVerifierError, match="HTTP 401"):
        RemoteVerifier(srv.url, "exact_answer")(["1+1="], ["2"], answer=["2"])
    with pytest.raises(RemoteVerifierError, match="HTTP 401"):
        RemoteVerifier(srv.url, "exact_answer", token="wrong")(["1+1="], ["2"], answer=["2"])
    good = RemoteVerifier(srv.url, "exact_answer", token="s3cret")
    assert good(["1+1="], ["2"], answer=["2"]) == [1.0]
    os.environ["BRAID_REWARD_TOKEN"] = "s3cret"  # removed again by the autouse fixture
    assert RemoteVerifier(srv.url, "exact_answer")(["1+1="], ["2"], answer=["2"]) == [1.0]


class _Canned(BaseHTTPRequestHandler):
    answers: list[bytes] = []

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        data = self.answers.pop(0)
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_):
        pass


def test_malformed_answers_score_none(caplog):
    _Canned.answers = [b'{"rewards": [1.0]}', b'{"rewards": ["x", 1, true, null]}',
                       b"not json", b'{"scores": [1, 1]}', b'{"rewards": [NaN, 0.25]}']
    stub = ThreadingHTTPServer(("127.0.0.1", 0), _Canned)
    threading.Thread(target=stub.serve_forever, args=(0.05,), daemon=True).start()
    try:
        remote = RemoteVerifier(f"http://127.0.0.1:{stub.server_address[1]}", "v")
        with caplog.at_level(logging.WARNING, "braid.reward.remote"):
            assert remote(["p"] * 2, ["a", "b"]) == [None, None]  # wrong length
            assert remote(["p"] * 4, list("abcd")) == [None, 1.0, None, None]
            assert remote(["p"] * 2, ["a", "b"]) == [None, None]  # not JSON
            assert remote(["p"] * 2, ["a", "b"]) == [None, None]  # no "rewards"
            assert remote(["p"] * 2, ["a", "b"]) == [None, 0.25]
        assert "malformed answer" in caplog.text and "malformed reward(s)" in caplog.text
    finally:
        stub.shutdown()
        stub.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_and_stops_on_sigterm(tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "BRAID_REWARD_TOKEN"}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "serve-reward",
             "rewards.arithmetic:exact_answer", "--port", str(port), "--timeout-s", "5",
             "--no-auth"],  # without a token the command refuses to start (issue 31)
            cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as resp:
                    assert json.loads(resp.read())["verifiers"] == ["exact_answer"]
                break
            except OSError:
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.1)
        remote = RemoteVerifier(url, "exact_answer", timeout_s=5)
        assert remote(["1+1=", "2+2="], ["2", "5"], answer=["2", "4"]) == [1.0, 0.0]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    assert "serving exact_answer on " + url in text
    assert '"POST /score/exact_answer" 200 n=2' in text and "stopped" in text


def test_cli_bad_import_path_exits_2():
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "serve-reward",
                           "no_such_module:fn", "--port", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "braid: recipe error: verifier 'fn': no module named 'no_such_module' "
        "(from 'no_such_module:fn')"]


def test_through_the_reward_worker(start):
    from workers.base import WorkerContext
    from workers.reward import RuleRewardWorker
    from workers.types import Rollouts

    def make(url):
        spec = {"fn": "rewards.remote:RemoteVerifier", "weight": 2.0,
                "args": {"url": url, "name": "exact_answer", "retries": 0, "timeout_s": 2}}
        args = RuleRewardWorker.check_args({"verifiers": [spec], "timeout_s": 5},
                                           "roles.reward.args")
        worker = RuleRewardWorker(WorkerContext("reward", 0, 1, None, args))
        worker.setup()
        return worker

    texts = ["3", "4", "7"]
    rollouts = Rollouts(list(range(3)), [[1]] * 3, [[5]] * 3, [[-0.1]] * 3, texts, ["stop"] * 3)
    records = [{"id": f"p{i}", "prompt": "1+2=", "answer": "3"} for i in range(3)]
    worker = make(start({"exact_answer": exact_answer}).url)
    try:
        s = worker.score(rollouts, records)
        assert s.per_verifier["RemoteVerifier"] == [1.0, 0.0, 0.0]
        assert s.rewards == [2.0, 0.0, 0.0] and not s.failures
    finally:
        worker.shutdown()
    # no server there: every sample is a counted failure, and the worker carries on. (Not the
    # server above shut down: the worker's forked verifier process holds its listening socket.)
    worker = make(f"http://127.0.0.1:{_free_port()}")
    try:
        t0 = time.monotonic()
        s = worker.score(rollouts, records)
        assert s.rewards == [None] * 3 and s.failures == {"RemoteVerifier": 3}
        assert s.failed_ids == ["p0#0", "p1#0", "p2#0"]
        assert time.monotonic() - t0 < 3.0  # connection refused is not retried here
    finally:
        worker.shutdown()


FACTORY = '''
class Threshold:
    """Scores 1.0 when the completion's length reaches `at`."""
    def __init__(self, at):
        self.at = at
    def __call__(self, prompts, completions, **_):
        return [float(len(c) >= self.at) for c in completions]
'''


def test_cli_verifier_specs(tmp_path, monkeypatch):
    from core.errors import RecipeError
    from rewards.remote import build_verifiers

    (tmp_path / "team_verifiers.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)  # the working directory is importable, as for recipes
    got = build_verifiers(["rewards.arithmetic:exact_answer"],
                          ["long=team_verifiers:Threshold"], ['long={"at": 3}'])
    assert sorted(got) == ["exact_answer", "long"] and got["exact_answer"] is exact_answer
    assert got["long"](["p", "p"], ["ab", "abc"]) == [0.0, 1.0]
    for specs, named, args, msg in (
            (["rewards.arithmetic:exact_answer"] * 2, [], [], "two verifiers named"),
            ([], ["oops"], [], "expected NAME=module:fn"),
            ([], [], [], "at least one verifier"),
            ([], ["long=team_verifiers:Threshold"], ["long={bad"], "not JSON"),
            ([], ["long=team_verifiers:Threshold"], ['other={"at": 1}'], "NAME one of"),
            ([], ["long=team_verifiers:Threshold"], ['long={"nope": 1}'], "building")):
        with pytest.raises(RecipeError, match=msg):
            build_verifiers(specs, named, args)
