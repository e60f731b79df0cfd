"""The client verifier: scores a batch on a reward server, in chunks, with retries (httpx)."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import threading
import time
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx

from core.errors import VerifierCallError
from rewards.remote import TOKEN_ENV

log = logging.getLogger("braid.reward.remote")
_RETRIED = (408, 429)  # the 4xx that mean "try again": a stalled upload, a busy server


class RemoteVerifierError(VerifierCallError):
    """The server refused a request with a 4xx other than 408 and 429: a setup bug (a wrong
    name, token or record fields), not a blip, so it is raised at once and never retried."""


def _jsonable(obj):
    if hasattr(obj, "tolist"):  # numpy scalars and arrays in dataset records
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _describe(data: bytes, limit: int = 120) -> str:
    text = repr(data)
    return text if len(text) <= limit else text[:limit] + "..."


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
    ``batch_size`` and sends up to ``max_concurrency`` at once over kept-alive connections; an
    attempt times out after ``timeout_s`` (per socket operation), and connection errors,
    timeouts, 408, 429 and 5xx are retried ``retries`` times after ``backoff_s * 2**k``
    seconds (times a jitter in [0.5, 1.5)). A chunk that still fails scores None; another 4xx
    raises :class:`RemoteVerifierError` at once. ``deadline_s`` caps one call's total time:
    keep it under the reward worker's ``timeout_s``, which otherwise kills the call and
    retries it sample by sample. ``token`` defaults to ``$BRAID_REWARD_TOKEN`` (``""``: send
    none).
    """

    def __init__(self, url: str, name: str | None = None, timeout_s: float = 10.0,
                 retries: int = 3, backoff_s: float = 0.5, max_concurrency: int = 4,
                 batch_size: int = 64, token: str | None = None,
                 deadline_s: float | None = None):
        self.endpoint, self.name = _endpoint(url, name)
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
        self._client: httpx.Client | None = None
        self._client_pid = -1

    def __repr__(self) -> str:
        return f"RemoteVerifier({self.endpoint!r})"

    def __getstate__(self):  # a pickled copy opens connections of its own
        return {**self.__dict__, "_client": None, "_client_pid": -1}

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
        client = self._http()  # made here, before the chunks' threads share it
        stop = threading.Event()  # set on a fatal error: the other chunks give up

        def chunk(lo: int) -> list[float | None]:
            hi = min(lo + self.batch_size, n)
            body = json.dumps({"prompts": list(prompts[lo:hi]),
                               "completions": list(completions[lo:hi]),
                               "fields": {k: list(v[lo:hi]) for k, v in fields.items()}},
                              default=_jsonable).encode()
            try:
                return self._send(client, body, hi - lo, f"samples {lo}-{hi - 1}", deadline,
                                  stop)
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

    def _http(self) -> httpx.Client:
        """This process's connection pool (the reward worker forks its verifier process: a
        pool inherited across a fork would share sockets with the parent)."""
        if self._client is None or self._client_pid != os.getpid():
            headers = {"Content-Type": "application/json"}
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
            # connections idle past 4 s are dropped before the server's idle timeout closes them
            limits = httpx.Limits(max_connections=self.max_concurrency, keepalive_expiry=4.0)
            self._client = httpx.Client(headers=headers, limits=limits, trust_env=False)
            self._client_pid = os.getpid()
        return self._client

    def _send(self, client: httpx.Client, body: bytes, n: int, what: str, deadline: float | None,
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
                resp = client.post(self.endpoint, content=body, timeout=timeout)
            except httpx.TransportError as err:
                cause = err.__cause__ or err  # the OSError under httpx's wrapper, if any
                last = f"{type(cause).__name__}: {cause}"
                continue
            status = resp.status_code
            if status == 200:
                return self._parse(resp.content, n, what)
            msg = _error_message(resp.content)
            if status in _RETRIED or status >= 500:
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


def _endpoint(url: str, name: str | None) -> tuple[str, str]:
    """``(the /score/<name> URL, the verifier's name)`` from the constructor's arguments."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"RemoteVerifier: url must be http(s)://host:port[/...], got {url!r}")
    if name is None:
        _, sep, tail = parts.path.rstrip("/").rpartition("/score/")
        if not sep or not tail or "/" in tail:
            raise ValueError(f"RemoteVerifier: give name=, or a url ending in "
                             f"/score/<name>, got {url!r}")
        return url.rstrip("/"), urllib.parse.unquote(tail)
    if not name or "/" in name:
        raise ValueError(f"RemoteVerifier: bad verifier name {name!r}")
    return f"{url.rstrip('/')}/score/{urllib.parse.quote(name, safe='')}", name
