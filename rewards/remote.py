"""Verifiers over HTTP: host them apart from the training cluster, score through them from it.

A team serves its verifiers (any ``(prompts, completions, **fields) -> list[float | None]``
callables) with ``braid serve-reward module:fn ...`` or :func:`serve`; a recipe scores through
them with the client verifier :class:`RemoteVerifier`::

    roles:
      reward:
        args:
          verifiers:
            - fn: rewards.remote:RemoteVerifier
              name: exact_answer           # metric name (default: "RemoteVerifier")
              args: {url: "http://verifiers.internal:8000", name: exact_answer}

Both sides use only the standard library.

Protocol (JSON over HTTP/1.0, one request per connection)::

    POST /score/<name>  {"prompts": [str, ...], "completions": [str, ...],
                         "fields": {"answer": [...], ...}}      "fields" optional, each list
                        -> 200 {"rewards": [number | null, ...]}  aligned with "completions"
    GET  /health        -> 200 {"status": "ok", "verifiers": [...], "in_flight": k,
                                "max_concurrency": m}            never needs the token
    GET  /verifiers     -> 200 {"verifiers": [{"name": ..., "doc": ...}, ...]}

With a token (``--token`` or ``$BRAID_REWARD_TOKEN``) every request but ``/health`` needs
``Authorization: Bearer <token>``. Errors are ``{"error": "<message>"}`` with the status:

    400  the body is not JSON or breaks the schema (types, lists of different lengths)
    401  missing or wrong bearer token
    404  unknown verifier or path; 405 wrong method; 411 no Content-Length
    413  body larger than ``max_body_bytes``
    500  the verifier raised (the message carries the exception) or returned something that is
         not one finite number or null per completion; the server stays up
    503  every verifier slot stayed busy for ``queue_timeout_s`` (sent with ``Retry-After``)
    504  the verifier ran past ``timeout_s``

Server concurrency: each request is a thread; at most ``max_concurrency`` verifier calls run at
once (a request waits up to ``queue_timeout_s`` for a slot, then gets 503). A verifier runs in
its own thread and the request answers 504 at ``timeout_s``, but a Python thread cannot be
killed: a timed-out call runs on, and keeps its slot until it returns. So a verifier that hangs
for good uses up the slots one by one and the server then answers 503 (visible in ``/health``)
instead of piling up threads: restart it. Verifiers must be thread-safe, and CPU-bound ones
share one core (the GIL): for more, run several servers behind a load balancer.

Client: :class:`RemoteVerifier` splits a batch into chunks of ``batch_size``, sends up to
``max_concurrency`` at once, and retries connection errors, timeouts, 429 and 5xx with
exponential backoff and jitter. A chunk still failing after ``retries`` retries scores None
(the reward worker counts those samples as failures) and logs a warning; a malformed answer
scores None per bad value. Any other 4xx is a bug in the setup (wrong name, token, schema) and
raises :class:`RemoteVerifierError` naming the URL, status and the server's message.

>>> from rewards.arithmetic import exact_answer
>>> server = serve({"exact_answer": exact_answer}, port=0)
>>> score = RemoteVerifier(server.url, "exact_answer")
>>> score(["1+1=", "2+2="], ["2", "5"], answer=["2", "4"])
[1.0, 0.0]
>>> server.shutdown()
"""

from __future__ import annotations

import argparse
import hmac
import http.client
import json
import logging
import math
import os
import random
import signal
import socket
import socketserver
import sys
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from core.errors import RecipeError
from core.registry import resolve
from rewards import as_rewards

log = logging.getLogger("braid.reward.remote")

TOKEN_ENV = "BRAID_REWARD_TOKEN"
_RESERVED = ("prompts", "completions")

# ---------------------------------------------------------------------------------------------
# server


class _Reply(Exception):
    """An error answer: raised anywhere in request handling, sent as {"error": message}."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _describe(out: Any, limit: int = 120) -> str:
    text = repr(out)
    return text if len(text) <= limit else text[:limit] + "..."


class RewardServer(ThreadingHTTPServer):
    """An HTTP server for a dict of verifiers; see the module docstring for the protocol.

    ``start()`` serves from a daemon thread, ``url`` is where, ``shutdown()`` stops it and
    closes the socket (calls still running in verifier threads are abandoned)."""

    daemon_threads = True

    def __init__(self, verifiers: dict[str, Callable], host: str = "127.0.0.1", port: int = 8000,
                 *, timeout_s: float = 30.0, max_concurrency: int = 8,
                 queue_timeout_s: float = 1.0, max_body_bytes: int = 32 << 20,
                 token: str | None = None):
        if not verifiers:
            raise ValueError("no verifiers to serve")
        for name, fn in verifiers.items():
            if not isinstance(name, str) or not name or "/" in name:
                raise ValueError(f"verifier name {name!r} must be a non-empty string without '/'")
            if not callable(fn):
                raise TypeError(f"verifier {name!r}: {fn!r} is not callable")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if queue_timeout_s < 0:
            raise ValueError(f"queue_timeout_s must be >= 0, got {queue_timeout_s}")
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
        self.verifiers = dict(verifiers)
        self.timeout_s = float(timeout_s)
        self.max_concurrency = int(max_concurrency)
        self.queue_timeout_s = float(queue_timeout_s)
        self.max_body_bytes = int(max_body_bytes)
        self.token = token or None
        self._slots = threading.BoundedSemaphore(self.max_concurrency)
        self._lock = threading.Lock()
        self.in_flight = 0  # verifier calls running, timed-out ones included
        self._thread: threading.Thread | None = None
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Handler)

    def server_bind(self):
        # HTTPServer.server_bind looks the host name up (getfqdn), which can stall without DNS
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> RewardServer:
        if self._thread is None:
            self._thread = threading.Thread(target=self.serve_forever, args=(0.1,), daemon=True,
                                            name="braid-reward-server")
            self._thread.start()
        return self

    def shutdown(self) -> None:
        if self._thread is not None:
            super().shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()

    def __exit__(self, *exc):
        self.shutdown()

    def run(self, name: str, prompts: list, completions: list, fields: dict) -> list:
        """Call one verifier under the concurrency and time limits; raise _Reply on failure."""
        fn = self.verifiers[name]
        if not self._slots.acquire(timeout=self.queue_timeout_s):
            raise _Reply(503, f"server busy: all {self.max_concurrency} verifier slots in use",
                         {"Retry-After": "1"})
        box: dict[str, Any] = {}
        done = threading.Event()

        def call():
            try:
                box["out"] = fn(prompts, completions, **fields)
            except BaseException as err:  # noqa: B036 - reported to the client, never re-raised
                box["err"] = err
                log.error("verifier %s raised:\n%s", name, traceback.format_exc().rstrip())
            finally:
                with self._lock:
                    self.in_flight -= 1
                self._slots.release()
                done.set()

        with self._lock:
            self.in_flight += 1
        try:
            threading.Thread(target=call, daemon=True, name=f"verifier-{name}").start()
        except BaseException:
            with self._lock:
                self.in_flight -= 1
            self._slots.release()
            raise
        if not done.wait(self.timeout_s):
            raise _Reply(504, f"verifier {name!r} ran past {self.timeout_s:g}s (it keeps a "
                              "server slot until it returns)")
        if "err" in box:
            err = box["err"]
            raise _Reply(500, f"verifier {name!r} raised {type(err).__name__}: {err}")
        rewards = as_rewards(box["out"], len(completions))
        if rewards is None:
            raise _Reply(500, f"verifier {name!r} returned malformed output (expected "
                              f"{len(completions)} finite numbers or nulls): "
                              f"{_describe(box['out'])}")
        return rewards


def _parse_score_request(body: bytes) -> tuple[list, list, dict]:
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise _Reply(400, f"body is not JSON: {err}") from None
    if not isinstance(req, dict):
        raise _Reply(400, "body must be a JSON object with 'prompts', 'completions' and "
                          "optionally 'fields'")
    extra = sorted(set(req) - {"prompts", "completions", "fields"})
    if extra:
        raise _Reply(400, f"unknown key(s) {extra}: expected 'prompts', 'completions', 'fields'")
    for key in _RESERVED:
        v = req.get(key)
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise _Reply(400, f"'{key}' must be a list of strings")
    prompts, completions = req["prompts"], req["completions"]
    n = len(completions)
    if len(prompts) != n:
        raise _Reply(400, f"'prompts' has {len(prompts)} items but 'completions' has {n}")
    fields = req.get("fields")
    if fields is None:
        fields = {}
    if not isinstance(fields, dict):
        raise _Reply(400, "'fields' must be an object of lists aligned with 'completions'")
    for k, v in fields.items():
        if k in _RESERVED:
            raise _Reply(400, f"field name {k!r} is reserved")
        if not isinstance(v, list) or len(v) != n:
            got = f"{len(v)} items" if isinstance(v, list) else type(v).__name__
            raise _Reply(400, f"field {k!r} must be a list of {n} items (one per completion), "
                              f"got {got}")
    return prompts, completions, fields


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    server_version = "braid-reward/1"
    timeout = 60  # seconds a client may stall mid-request before its connection is dropped

    # one log line per request, written by _handle; http.server's own errors go to the log too
    def log_request(self, code="-", size="-"):
        pass

    def log_message(self, format, *args):
        log.warning("%s %s", self.address_string(), format % args)

    def do_GET(self):
        self._handle()

    def do_POST(self):
        self._handle()

    def _handle(self):
        t0 = time.monotonic()
        self._unread = self._content_length(strict=False) if self.command == "POST" else 0
        n: Any = "-"
        headers: dict[str, str] = {}
        try:
            status, body, n = self._route()
        except _Reply as reply:
            status, body, headers = reply.status, {"error": reply.message}, reply.headers
        except Exception as err:  # a bug here must not take the server down
            log.exception("internal error on %s %s", self.command, self.path)
            status, body = 500, {"error": f"internal server error: {type(err).__name__}: {err}"}
        if status == 401:
            headers = {**headers, "WWW-Authenticate": "Bearer"}
        self._drain()
        self._send(status, body, headers)
        log.info('%s "%s %s" %d n=%s %.3fs', self.client_address[0], self.command, self.path,
                 status, n, time.monotonic() - t0)

    def _route(self) -> tuple[int, dict, Any]:
        srv = self.server
        path = urllib.parse.urlsplit(self.path).path
        if path == "/health":
            self._method("GET")
            return 200, {"status": "ok", "verifiers": sorted(srv.verifiers),
                         "in_flight": srv.in_flight, "max_concurrency": srv.max_concurrency}, "-"
        self._auth()
        if path == "/verifiers":
            self._method("GET")
            return 200, {"verifiers": [
                {"name": k, "doc": ((getattr(fn, "__doc__", None) or "").strip().splitlines()
                                    or [""])[0]}
                for k, fn in sorted(srv.verifiers.items())]}, "-"
        if path.startswith("/score/"):
            self._method("POST")
            name = urllib.parse.unquote(path[len("/score/"):])
            if name not in srv.verifiers:
                raise _Reply(404, f"no verifier named {name!r} (this server has "
                                  f"{sorted(srv.verifiers)})")
            prompts, completions, fields = _parse_score_request(self._body())
            if not completions:
                return 200, {"rewards": []}, 0
            return 200, {"rewards": srv.run(name, prompts, completions, fields)}, len(completions)
        raise _Reply(404, f"no such path {path!r}: try /health, /verifiers, POST /score/<name>")

    def _method(self, method: str):
        if self.command != method:
            raise _Reply(405, f"{self.path} takes {method}, not {self.command}",
                         {"Allow": method})

    def _auth(self):
        token = self.server.token
        if token is None:
            return
        scheme, _, cred = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(cred.strip().encode(),
                                                                 token.encode()):
            raise _Reply(401, "missing or wrong bearer token (send 'Authorization: Bearer "
                              "<token>')")

    def _content_length(self, strict: bool) -> int:
        raw = self.headers.get("Content-Length")
        if raw is None:
            if strict:
                raise _Reply(411, "a Content-Length header is required")
            return 0
        try:
            length = int(raw)
            if length < 0:
                raise ValueError
        except ValueError:
            if strict:
                raise _Reply(400, f"bad Content-Length {raw!r}") from None
            return 0
        return length

    def _body(self) -> bytes:
        length = self._content_length(strict=True)
        if length > self.server.max_body_bytes:
            raise _Reply(413, f"body of {length} bytes is over the server's limit of "
                              f"{self.server.max_body_bytes}: send smaller batches")
        body = self.rfile.read(length)
        self._unread = 0
        if len(body) != length:
            raise _Reply(400, f"body ended after {len(body)} of {length} bytes")
        return body

    def _drain(self):
        """Read a body the request left unread (up to a bound), so that closing the connection
        does not reset it before the client has read the error answer."""
        left = self._unread if self._unread <= 4 * self.server.max_body_bytes else 0
        self._unread = 0
        try:
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def _send(self, status: int, body: dict, headers: dict[str, str]):
        data = json.dumps(body, allow_nan=False).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except OSError as err:  # the client went away (gave up waiting, say)
            log.warning("%s: could not send the %d answer: %s", self.client_address[0], status,
                        err)


def make_server(verifiers: dict[str, Callable], host: str = "127.0.0.1", port: int = 8000,
                **kwargs) -> RewardServer:
    """A bound, not yet serving :class:`RewardServer`; ``port=0`` picks a free port.

    Keyword arguments: ``timeout_s`` (per verifier call, 504 past it), ``max_concurrency``
    (verifier calls at once), ``queue_timeout_s`` (wait for a slot, 503 past it),
    ``max_body_bytes`` (413 past it), ``token`` (bearer token; None: no auth)."""
    return RewardServer(verifiers, host, port, **kwargs)


def serve(verifiers: dict[str, Callable], host: str = "127.0.0.1", port: int = 8000,
          **kwargs) -> RewardServer:
    """:func:`make_server`, serving from a daemon thread; stop it with ``.shutdown()``."""
    return make_server(verifiers, host, port, **kwargs).start()


# ---------------------------------------------------------------------------------------------
# client


class RemoteVerifierError(RuntimeError):
    """The server refused a request with a 4xx other than 429: a setup bug, not a blip."""


def _jsonable(obj):
    if hasattr(obj, "tolist"):  # numpy scalars and arrays in dataset records
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _error_message(data: bytes) -> str:
    try:
        obj = json.loads(data)
        if isinstance(obj, dict) and isinstance(obj.get("error"), str):
            return obj["error"]
    except ValueError:
        pass
    text = data.decode("utf-8", "replace").strip()
    return (text[:200] + "...") if len(text) > 200 else (text or "(empty body)")


class RemoteVerifier:
    """A verifier that scores on a remote server (``braid serve-reward``).

    ``url`` is the server's base URL with ``name`` the verifier to call, or the full
    ``.../score/<name>`` URL when ``name`` is None. Each call splits the batch into chunks of
    ``batch_size`` and sends up to ``max_concurrency`` at once; an attempt times out after
    ``timeout_s`` (per socket operation), and connection errors, timeouts, 429 and 5xx are
    retried ``retries`` times after ``backoff_s * 2**k`` seconds (times a jitter in
    [0.5, 1.5)). A chunk that still fails scores None; another 4xx raises
    :class:`RemoteVerifierError`. ``deadline_s`` caps one call's total time: keep it under the
    reward worker's ``timeout_s``, which otherwise kills the call and retries it sample by
    sample. ``token`` defaults to ``$BRAID_REWARD_TOKEN`` (``""``: send none).
    """

    def __init__(self, url: str, name: str | None = None, timeout_s: float = 10.0,
                 retries: int = 3, backoff_s: float = 0.5, max_concurrency: int = 4,
                 batch_size: int = 64, token: str | None = None,
                 deadline_s: float | None = None):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"RemoteVerifier: url must be http(s)://host:port[/...], got {url!r}")
        if name is None:
            head, sep, tail = parts.path.rstrip("/").rpartition("/score/")
            if not sep or not tail or "/" in tail:
                raise ValueError(f"RemoteVerifier: give name=, or a url ending in "
                                 f"/score/<name>, got {url!r}")
            self.endpoint, self.name = url.rstrip("/"), urllib.parse.unquote(tail)
        else:
            if not name or "/" in name:
                raise ValueError(f"RemoteVerifier: bad verifier name {name!r}")
            self.endpoint = f"{url.rstrip('/')}/score/{urllib.parse.quote(name, safe='')}"
            self.name = name
        for what, v, low in (("timeout_s", timeout_s, 0), ("backoff_s", backoff_s, None),
                             ("deadline_s", deadline_s, 0)):
            if v is not None and (v < 0 if low is None else v <= low):
                raise ValueError(f"RemoteVerifier: {what} must be "
                                 f"{'>= 0' if low is None else '> 0'}, got {v}")
        if retries < 0 or max_concurrency < 1 or batch_size < 1:
            raise ValueError("RemoteVerifier: retries must be >= 0, max_concurrency and "
                             "batch_size >= 1")
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), backoff_s
        self.max_concurrency, self.batch_size = int(max_concurrency), int(batch_size)
        self.deadline_s = deadline_s
        self.token = os.environ.get(TOKEN_ENV) if token is None else token
        self.__name__ = self.name

    def __repr__(self) -> str:
        return f"RemoteVerifier({self.endpoint!r})"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 **fields) -> list[float | None]:
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"{self!r}: {len(prompts)} prompts for {n} completions")
        for k, v in fields.items():
            if not isinstance(v, Sequence) or isinstance(v, str) or len(v) != n:
                raise ValueError(f"{self!r}: field {k!r} must be a list of {n} values")
        if n == 0:
            return []
        deadline = None if self.deadline_s is None else time.monotonic() + self.deadline_s
        stop = threading.Event()  # set on a fatal error: the other chunks give up

        def chunk(lo: int) -> list[float | None]:
            hi = min(lo + self.batch_size, n)
            body = json.dumps({"prompts": list(prompts[lo:hi]),
                               "completions": list(completions[lo:hi]),
                               "fields": {k: list(v[lo:hi]) for k, v in fields.items()}},
                              default=_jsonable).encode()
            try:
                return self._send(body, hi - lo, f"samples {lo}-{hi - 1}", deadline, stop)
            except RemoteVerifierError:
                stop.set()
                raise

        starts = range(0, n, self.batch_size)
        if len(starts) == 1:
            return chunk(0)
        pool = ThreadPoolExecutor(min(self.max_concurrency, len(starts)),
                                  thread_name_prefix="remote-verifier")
        try:
            futures = [pool.submit(chunk, lo) for lo in starts]
            return [x for f in futures for x in f.result()]
        finally:
            pool.shutdown(wait=not stop.is_set(), cancel_futures=True)

    def _post(self, body: bytes, timeout: float) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            with err:
                return err.code, err.read()

    def _send(self, body: bytes, n: int, what: str, deadline: float | None,
              stop: threading.Event) -> list[float | None]:
        last = "no attempt made"
        attempts = 0
        for attempt in range(self.retries + 1):
            if attempt:
                delay = self.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
                if deadline is not None and time.monotonic() + delay >= deadline:
                    break
                if stop.wait(delay):
                    break
            if stop.is_set():
                break
            timeout = self.timeout_s
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
                if timeout <= 0:
                    break
            attempts += 1
            try:
                status, data = self._post(body, timeout)
            except (OSError, http.client.HTTPException) as err:
                reason = getattr(err, "reason", None) or err  # URLError wraps the cause
                last = f"{type(reason).__name__}: {reason}"
                continue
            if status == 200:
                return self._parse(data, n, what)
            msg = _error_message(data)
            if status == 429 or status >= 500:
                last = f"HTTP {status}: {msg}"
                continue
            raise RemoteVerifierError(f"{self.endpoint} answered HTTP {status}: {msg}")
        if not stop.is_set():
            log.warning("remote verifier %s: %s scored None after %d attempt(s); last error: %s",
                        self.endpoint, what, attempts, last)
        return [None] * n

    def _parse(self, data: bytes, n: int, what: str) -> list[float | None]:
        try:
            obj = json.loads(data)
        except ValueError:
            obj = None
        rewards = obj.get("rewards") if isinstance(obj, dict) else None
        if not isinstance(rewards, list) or len(rewards) != n:
            log.warning("remote verifier %s: malformed answer for %s (expected 'rewards', a "
                        "list of %d): %s", self.endpoint, what, n, _describe(data))
            return [None] * n
        out = [float(v) if isinstance(v, (int, float)) and not isinstance(v, bool)
               and math.isfinite(v) else None for v in rewards]
        bad = sum(1 for v, o in zip(rewards, out) if o is None and v is not None)
        if bad:
            log.warning("remote verifier %s: %d malformed reward(s) for %s scored None",
                        self.endpoint, bad, what)
        return out


# ---------------------------------------------------------------------------------------------
# command line: braid serve-reward


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("verifiers", nargs="*", metavar="module:fn",
                   help="verifier callables by import path, each served under its own name "
                        "(the part after ':'); the working directory is importable")
    p.add_argument("--name", action="append", default=[], metavar="NAME=module:fn",
                   help="serve a verifier under NAME (repeatable)")
    p.add_argument("--args", action="append", default=[], metavar="NAME=JSON",
                   help="NAME's import path is a factory (a class): call it once with this JSON "
                        "object's keyword arguments to build the verifier (repeatable)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1: this machine only; 0.0.0.0 "
                        "exposes the verifiers to the network, so set a token)")
    p.add_argument("--port", type=int, default=8000, help="default 8000; 0 picks a free one")
    p.add_argument("--timeout-s", type=float, default=30.0,
                   help="per verifier call; past it the request answers 504 (default 30)")
    p.add_argument("--max-concurrency", type=int, default=8,
                   help="verifier calls running at once (default 8)")
    p.add_argument("--queue-timeout-s", type=float, default=1.0,
                   help="how long a request waits for a free slot before 503 (default 1)")
    p.add_argument("--max-body-mb", type=float, default=32.0,
                   help="largest request body; bigger ones get 413 (default 32)")
    p.add_argument("--token", default=None,
                   help=f"require 'Authorization: Bearer TOKEN' (default: ${TOKEN_ENV}; prefer "
                        "the variable, a command line is visible to other users)")


def build_verifiers(specs: list[str], named: list[str], factory_args: list[str]) -> dict:
    """Resolve the command line's verifiers to ``{name: callable}``; RecipeError if bad."""
    paths: dict[str, str] = {}

    def add(name: str, path: str, where: str):
        if not name or "/" in name:
            raise RecipeError(f"{where}: bad verifier name {name!r}")
        if name in paths:
            raise RecipeError(f"{where}: two verifiers named {name!r} (use --name NAME=...)")
        paths[name] = path

    for spec in specs:
        add(spec.rpartition(":")[2].rpartition(".")[2], spec, spec)
    for item in named:
        name, sep, path = item.partition("=")
        if not sep:
            raise RecipeError(f"--name {item}: expected NAME=module:fn")
        add(name, path, f"--name {item}")
    if not paths:
        raise RecipeError("serve-reward: name at least one verifier (module:fn)")
    kwargs: dict[str, dict] = {}
    for item in factory_args:
        name, sep, text = item.partition("=")
        if not sep or name not in paths:
            raise RecipeError(f"--args {item}: expected NAME=JSON with NAME one of "
                              f"{sorted(paths)}")
        try:
            value = json.loads(text)
        except ValueError as err:
            raise RecipeError(f"--args {name}: not JSON: {err}") from None
        if not isinstance(value, dict):
            raise RecipeError(f"--args {name}: expected a JSON object of keyword arguments")
        kwargs[name] = value
    verifiers = {}
    for name, path in paths.items():
        fn = resolve(path, f"verifier {name!r}")
        if name in kwargs:
            try:
                fn = fn(**kwargs[name])
            except Exception as err:
                raise RecipeError(f"--args {name}: building {path} failed: "
                                  f"{type(err).__name__}: {err}") from None
        if not callable(fn):
            raise RecipeError(f"verifier {name!r}: {path} is not callable")
        verifiers[name] = fn
    return verifiers


def cmd_serve_reward(args: argparse.Namespace) -> int:
    """``braid serve-reward``: serve until SIGTERM or SIGINT, then exit 0."""
    verifiers = build_verifiers(args.verifiers, args.name, args.args)
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    try:
        server = make_server(verifiers, args.host, args.port, timeout_s=args.timeout_s,
                             max_concurrency=args.max_concurrency,
                             queue_timeout_s=args.queue_timeout_s,
                             max_body_bytes=max(1, int(args.max_body_mb * (1 << 20))),
                             token=token)
    except (ValueError, TypeError, OverflowError) as err:
        raise RecipeError(f"serve-reward: {err}") from None
    except OSError as err:
        print(f"braid: serve-reward: cannot listen on {args.host}:{args.port}: {err}",
              file=sys.stderr)
        return 1
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        server.start()
        if not token and args.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("listening on %s without a token: anyone who can reach the port can "
                        "run these verifiers", args.host)
        log.info("serving %s on %s (timeout %gs, %d at once%s)", ", ".join(sorted(verifiers)),
                 server.url, server.timeout_s, server.max_concurrency,
                 ", token required" if token else "")
        while not stop.wait(1.0):
            pass
    finally:
        server.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m rewards.remote ...``: the same as ``braid serve-reward ...``."""
    parser = argparse.ArgumentParser(prog="python -m rewards.remote",
                                     description="serve verifiers over HTTP")
    add_cli_arguments(parser)
    try:
        return cmd_serve_reward(parser.parse_args(argv))
    except RecipeError as err:
        print(f"braid: recipe error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
