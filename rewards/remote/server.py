"""The reward server: FastAPI routes on uvicorn, each verifier with its own slots.

uvicorn owns the sockets (asyncio, so an idle or slow client costs a socket, not a thread) and
the HTTP parsing (h11: conflicting Content-Length headers and bad framing never reach a route).
On top of it, here: a deadline for each request's headers and for idle connections
(:class:`_Protocol`), a connection cap answered in JSON (:class:`_Front`), the bearer token
checked before any body is read, and a deadline for the rest of the request. The verifier
calls themselves, under per-verifier slots, are in ``calls.py``.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from rewards import as_rewards
from rewards.remote.calls import Reply, ServedVerifier, parse_score_request

log = logging.getLogger("braid.reward.remote")

_PARSE_INLINE_BYTES = 1 << 16  # bodies above this are parsed off the event loop


def _describe(out: Any, limit: int = 120) -> str:
    text = repr(out)
    return text if len(text) <= limit else text[:limit] + "..."


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: may resolve anywhere
        return False


def _content_length(request: Request, limit: int) -> int:
    """The body's declared length; 400 on ambiguous framing, 411 without one, 413 past limit."""
    if "transfer-encoding" in request.headers:
        if "content-length" in request.headers:
            # the connection's framing is in doubt from here (request smuggling): close it
            raise Reply(400, "ambiguous framing: both Transfer-Encoding and Content-Length",
                        {"Connection": "close"})
        raise Reply(411, "a Content-Length header is required (no chunked bodies)")
    raw = request.headers.get("content-length")
    if raw is None:
        raise Reply(411, "a Content-Length header is required")
    length = int(raw)  # h11 has checked it is digits, and one value
    if length > limit:
        raise Reply(413, f"body of {length} bytes is over the server's limit of {limit}: send "
                         "smaller batches")
    return length


async def _read_body(request: Request, length: int, seconds: float) -> bytes:
    """The body, read within ``seconds`` (408 past it: a stalled upload must not hold on)."""
    async def read() -> bytes:
        parts, got = [], 0
        async for chunk in request.stream():
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts) if got == length else b""

    try:
        body = await asyncio.wait_for(read(), max(seconds, 0.0))
    except asyncio.TimeoutError:
        raise Reply(408, f"body not received within the request deadline of {seconds:.3g}s",
                    {"Connection": "close"}) from None
    if len(body) != length:
        raise Reply(400, f"body ended before its {length} bytes")
    return body


# ---------------------------------------------------------------------------------------------
# the app


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """{"error": message}, with ``headers`` sent in the case given (Starlette lowercases header
    names; clients that read them into a plain dict look them up as the protocol spells them)."""
    resp = JSONResponse({"error": message}, status)
    resp.raw_headers += [(k.encode("latin-1"), v.encode("latin-1"))
                         for k, v in (headers or {}).items()]
    return resp


def build_app(srv: RewardServer) -> FastAPI:
    """The routes: /health (open), /verifiers and POST /score/<name> (token checked first)."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.exception_handler(Reply)
    async def on_reply(request: Request, err: Reply):
        return _error(err.status, err.message, err.headers)

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, err: HTTPException):
        path = request.url.path
        if err.status_code == 405:
            allow = (err.headers or {}).get("Allow", "")
            takes = "POST" if "POST" in allow else "GET"
            return _error(405, f"{path} takes {takes}, not {request.method}", {"Allow": allow})
        if err.status_code == 404:
            return _error(404, f"no such path {path!r}: try /health, /verifiers, "
                               "POST /score/<name>")
        return _error(err.status_code, str(err.detail), err.headers)

    @app.get("/health")
    async def health():
        return srv.health()

    @app.get("/verifiers")
    async def verifiers(request: Request):
        srv.check_token(request)
        return {"verifiers": [
            {"name": k, "doc": ((getattr(v.fn, "__doc__", None) or "").strip().splitlines()
                                or [""])[0]}
            for k, v in sorted(srv.verifiers.items())]}

    @app.post("/score/{name}")
    async def score(name: str, request: Request):
        srv.check_token(request)
        try:
            return await srv.score(name, request)
        except Reply:
            raise
        except Exception as err:  # a bug here must not take the server down
            log.exception("internal error on POST %s", request.url.path)
            raise Reply(500, f"internal server error: {type(err).__name__}") from None

    return _Front(app, srv)


class _Front:
    """What every request meets first: the connection cap (503, JSON, the connection closed:
    uvicorn's own cap answers plain text), then one log line per request (client, method,
    path, status, samples scored, seconds)."""

    def __init__(self, app, srv: RewardServer):
        self.app, self.srv = app, srv

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.monotonic(), [0]

        async def send_logged(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        app = self.app if self.srv.connections() <= self.srv.max_connections else _too_many
        try:
            await app(scope, receive, send_logged)
        finally:
            log.info('%s "%s %s" %d n=%s %.3fs', (scope.get("client") or ("-",))[0],
                     scope["method"], scope["path"], status[0],
                     scope.get("state", {}).get("n", "-"), time.monotonic() - t0)


async def _too_many(scope, receive, send):
    await _error(503, "server busy: too many open connections",
                 {"Retry-After": "1", "Connection": "close"})(scope, receive, send)


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on idle connections, and its own 400s as JSON.

    uvicorn arms its keep-alive timer only after an answer, and any byte received cancels it:
    a client that connects and sends nothing, or sends headers a byte at a time, would hold its
    connection (and a place under the connection cap) for good. Here a connection must bring a
    request's headers within ``timeout_keep_alive`` seconds of opening or of its last answer.
    """

    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport):
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc):
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self):
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's headers arrived: the app's deadline applies
            self._disarm()

    def on_response_complete(self):
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def send_400_response(self, msg: str):
        body = json.dumps({"error": "malformed HTTP request (framing or headers)"}).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                      h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def _arm(self):
        self._disarm()
        self._deadline = self.loop.call_later(self.timeout_keep_alive, self._expire)

    def _disarm(self):
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self):
        self._deadline = None
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()


# ---------------------------------------------------------------------------------------------
# the server


class RewardServer:
    """An HTTP server for a dict of verifiers; see :mod:`rewards.remote` for the protocol.

    The constructor binds the socket (OSError if it cannot); ``start()`` serves from a daemon
    thread, ``url`` is where, ``shutdown()`` stops it (calls still running in verifier
    threads are abandoned). ``token=None`` serves without auth, allowed on a loopback host
    only unless ``insecure_network`` is set."""

    def __init__(self, verifiers: dict[str, Callable], host: str = "127.0.0.1", port: int = 8000,
                 *, timeout_s: float = 30.0, max_concurrency: int = 8,
                 queue_timeout_s: float = 1.0, max_body_bytes: int = 32 << 20,
                 token: str | None = None, request_timeout_s: float = 60.0,
                 idle_timeout_s: float = 10.0, max_connections: int = 1000,
                 insecure_network: bool = False):
        _check_verifiers(verifiers)
        _check_limits(timeout_s=timeout_s, request_timeout_s=request_timeout_s,
                      idle_timeout_s=idle_timeout_s, queue_timeout_s=queue_timeout_s,
                      max_concurrency=max_concurrency, max_body_bytes=max_body_bytes,
                      max_connections=max_connections)
        if token is not None and not token.strip():
            raise ValueError("empty token: give a token, or None to serve without auth")
        if token is None and not is_loopback(host) and not insecure_network:
            raise ValueError(f"no token on {host}, which other machines can reach: give a "
                             "token (or insecure_network=True)")
        self.verifiers = {k: ServedVerifier(k, fn, int(max_concurrency))
                          for k, fn in verifiers.items()}
        self.timeout_s, self.queue_timeout_s = float(timeout_s), float(queue_timeout_s)
        self.request_timeout_s = float(request_timeout_s)
        self.max_concurrency, self.max_body_bytes = int(max_concurrency), int(max_body_bytes)
        self.token, self.max_connections = token, int(max_connections)
        self._socket = _bind(host, port)
        config = uvicorn.Config(build_app(self), http=_Protocol, lifespan="off", log_config=None,
                                access_log=False, server_header=False,
                                timeout_keep_alive=idle_timeout_s, timeout_graceful_shutdown=2)
        self._uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._socket.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def connections(self) -> int:
        """Connections open now, this request's included."""
        return len(self._uvicorn.server_state.connections)

    @property
    def in_flight(self) -> int:
        return sum(v.in_flight for v in self.verifiers.values())

    def start(self) -> RewardServer:
        if self._thread is None:
            self._thread = threading.Thread(target=self._uvicorn.run,
                                            kwargs={"sockets": [self._socket]}, daemon=True,
                                            name="braid-reward-server")
            self._thread.start()
            deadline = time.monotonic() + 30
            while not self._uvicorn.started and self._thread.is_alive():
                if time.monotonic() > deadline:
                    raise RuntimeError("the reward server did not start within 30 s")
                time.sleep(0.01)
        return self

    def shutdown(self) -> None:
        if self._thread is not None:
            self._uvicorn.should_exit = True
            self._thread.join()
            self._thread = None
        self._socket.close()

    def __enter__(self) -> RewardServer:
        return self.start()

    def __exit__(self, *exc):
        self.shutdown()

    def check_token(self, request: Request) -> None:
        """401 unless the request carries the token; called before any body is read."""
        if self.token is None:
            return
        scheme, _, cred = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(cred.strip().encode(),
                                                                 self.token.encode()):
            raise Reply(401, "missing or wrong bearer token (send 'Authorization: Bearer "
                             "<token>')", {"WWW-Authenticate": "Bearer"})

    def health(self) -> dict:
        """ok; degraded while some verifier has calls running past their timeout; saturated
        when every verifier's slots are all held by such calls."""
        states = {k: v.status for k, v in self.verifiers.items()}
        status = ("saturated" if all(s == "saturated" for s in states.values()) else
                  "degraded" if any(s != "ok" for s in states.values()) else "ok")
        return {"status": status, "verifiers": sorted(self.verifiers),
                "in_flight": self.in_flight, "max_concurrency": self.max_concurrency,
                "slots": {k: {"status": v.status, "in_flight": v.in_flight,
                              "overdue": v.overdue, "timed_out": v.timed_out}
                          for k, v in sorted(self.verifiers.items())}}

    async def score(self, name: str, request: Request) -> dict:
        """POST /score/<name>, after the token check: every step bounded by the deadline."""
        deadline = time.monotonic() + self.request_timeout_s
        verifier = self.verifiers.get(name)
        if verifier is None:
            raise Reply(404, f"no verifier named {name!r} (this server has "
                             f"{sorted(self.verifiers)})")
        length = _content_length(request, self.max_body_bytes)
        body = await _read_body(request, length, deadline - time.monotonic())
        if length <= _PARSE_INLINE_BYTES:
            prompts, completions, fields = parse_score_request(body)
        else:
            prompts, completions, fields = await asyncio.to_thread(parse_score_request, body)
        verifier.check_fields(fields)
        request.state.n = len(completions)
        if not completions:
            return {"rewards": []}
        left = deadline - time.monotonic()
        out = await verifier.call(prompts, completions, fields, min(self.timeout_s, left),
                                  min(self.queue_timeout_s, max(left, 0.0)))
        rewards = as_rewards(out, len(completions))
        if rewards is None:
            raise Reply(500, f"verifier {name!r} returned malformed output (expected "
                             f"{len(completions)} finite numbers or nulls): {_describe(out)}")
        return {"rewards": rewards}


def _check_verifiers(verifiers: dict[str, Callable]) -> None:
    if not verifiers:
        raise ValueError("no verifiers to serve")
    for name, fn in verifiers.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"verifier name {name!r} must be a non-empty string without '/'")
        if not callable(fn):
            raise TypeError(f"verifier {name!r}: {fn!r} is not callable")


def _check_limits(**limits) -> None:
    """Counts (max_*) must be >= 1, queue_timeout_s >= 0, the other times > 0."""
    for key, v in limits.items():
        if key.startswith("max_"):
            ok, want = v >= 1, ">= 1"
        elif key == "queue_timeout_s":
            ok, want = v >= 0, ">= 0"
        else:
            ok, want = v > 0, "> 0"
        if not ok:
            raise ValueError(f"{key} must be {want}, got {v}")


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), before the server runs, so that
    the caller learns the port, or why it cannot listen, at once."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)  # a burst of clients waits here instead of being reset
    except BaseException:
        sock.close()
        raise
    return sock


def make_server(verifiers: dict[str, Callable], host: str = "127.0.0.1", port: int = 8000,
                **kwargs) -> RewardServer:
    """A bound, not yet serving :class:`RewardServer`; ``port=0`` picks a free port.

    Keyword arguments: ``timeout_s`` (per verifier call, 504 past it), ``max_concurrency``
    (calls at once per verifier), ``queue_timeout_s`` (wait for a slot, 503 past it),
    ``max_body_bytes`` (413 past it), ``token`` (bearer token; None: no auth, loopback only
    unless ``insecure_network``), ``request_timeout_s`` (a request's whole time once its
    headers are in), ``idle_timeout_s`` (to bring a request's headers, on a new or kept-alive
    connection), ``max_connections`` (past it requests get 503)."""
    return RewardServer(verifiers, host, port, **kwargs)


def serve(verifiers: dict[str, Callable], host: str = "127.0.0.1", port: int = 8000,
          **kwargs) -> RewardServer:
    """:func:`make_server`, serving from a daemon thread; stop it with ``.shutdown()``."""
    return make_server(verifiers, host, port, **kwargs).start()
