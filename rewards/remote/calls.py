"""What a request asks of a verifier: the body parsed and checked against the protocol and the
verifier's signature, then the call, in a worker thread under one of the verifier's slots."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("braid.reward.remote")

_RESERVED = ("prompts", "completions")


class Reply(Exception):
    """An error answer: raised anywhere in request handling, sent as {"error": message}."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _one_line(err: BaseException, limit: int = 200) -> str:
    """What a caller sees of an exception: its type and first line, cut short. The traceback
    (internal paths, locals in messages) stays in the server's log."""
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------------------------
# verifiers and their slots


class _Workers:
    """Threads that run one verifier's calls, at most ``limit``, started as needed and reused:
    starting a thread costs about a millisecond, more than a trivial verifier's call. Daemon
    threads, so a call that never returns does not keep the process from exiting
    (ThreadPoolExecutor's threads are joined at exit)."""

    def __init__(self, name: str, limit: int):
        self.name, self.limit = name, limit
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.idle = self.started = 0

    def submit(self, job: Callable[[], None]) -> None:
        with self.lock:
            if not self.idle and self.started < self.limit:
                threading.Thread(target=self._work, daemon=True,
                                 name=f"verifier-{self.name}-{self.started}").start()
                self.started += 1
        self.jobs.put(job)

    def _work(self):
        while True:
            with self.lock:
                self.idle += 1
            job = self.jobs.get()
            with self.lock:
                self.idle -= 1
            job()


class ServedVerifier:
    """One served verifier with slots of its own: a hung call holds one of these, never another
    verifier's. A Python thread cannot be killed, so a call past its timeout (answered 504)
    keeps its slot until it returns, and is counted as overdue for ``/health``."""

    def __init__(self, name: str, fn: Callable, slots: int):
        self.name, self.fn, self.slots = name, fn, slots
        self.signature = _signature(fn)
        self.free = asyncio.Semaphore(slots)
        self.workers = _Workers(name, slots)  # as many as slots: a job never waits for one
        self.in_flight = 0  # calls running, overdue ones included
        self.overdue = 0  # calls running past their timeout
        self.timed_out = 0  # calls that ever ran past their timeout, since start

    @property
    def status(self) -> str:
        if self.overdue >= self.slots:
            return "saturated"
        return "degraded" if self.overdue else "ok"

    def check_fields(self, fields: dict) -> None:
        """400 before the call if the verifier's signature cannot take these fields."""
        if self.signature is None:
            return
        try:
            self.signature.bind([], [], **fields)
        except TypeError as err:
            raise Reply(400, f"verifier {self.name!r} cannot be called with fields "
                             f"{sorted(fields)}: {err}") from None

    async def call(self, prompts: list, completions: list, fields: dict, timeout_s: float,
                   queue_timeout_s: float) -> Any:
        """The verifier's output, run in a thread of its own under one of its slots."""
        try:
            if self.free.locked():  # (wait_for(..., 0) would time out even with a slot free)
                await asyncio.wait_for(self.free.acquire(), queue_timeout_s)
            else:
                await self.free.acquire()
        except asyncio.TimeoutError:
            raise Reply(503, f"server busy: all {self.slots} slots of verifier {self.name!r} "
                             "in use", {"Retry-After": "1"}) from None
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        overdue = False

        def finish(outcome: tuple[bool, Any]):  # on the event loop
            self.in_flight -= 1
            self.overdue -= overdue
            self.free.release()
            done.set_result(outcome)

        def work():
            try:
                outcome = (True, self.fn(prompts, completions, **fields))
            except BaseException as err:  # noqa: B036 - reported to the caller, not re-raised
                log.exception("verifier %s raised", self.name)
                outcome = (False, err)
            try:
                loop.call_soon_threadsafe(finish, outcome)
            except RuntimeError:  # the event loop is closed: the server has stopped
                pass

        self.in_flight += 1
        try:
            self.workers.submit(work)
        except BaseException:
            self.in_flight -= 1
            self.free.release()
            raise
        try:
            ok, value = await asyncio.wait_for(asyncio.shield(done), timeout_s)
        except asyncio.TimeoutError:
            overdue = True
            self.overdue += 1
            self.timed_out += 1
            raise Reply(504, f"verifier {self.name!r} ran past {timeout_s:g}s (it keeps one of "
                             "its slots until it returns)") from None
        if not ok:
            raise Reply(500, f"verifier {self.name!r} raised {_one_line(value)}")
        return value


def _signature(fn: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and C callables have none: not checked
        return None


# ---------------------------------------------------------------------------------------------
# requests


def parse_score_request(body: bytes) -> tuple[list, list, dict]:
    """``(prompts, completions, fields)`` from a /score body; Reply(400) naming what is wrong."""
    try:
        req = json.loads(body)
    except RecursionError:
        raise Reply(400, "body is JSON nested too deep") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise Reply(400, f"body is not JSON: {err}") from None
    if not isinstance(req, dict):
        raise Reply(400, "body must be a JSON object with 'prompts', 'completions' and "
                         "optionally 'fields'")
    extra = sorted(set(req) - {"prompts", "completions", "fields"})
    if extra:
        raise Reply(400, f"unknown key(s) {extra}: expected 'prompts', 'completions', 'fields'")
    for key in _RESERVED:
        v = req.get(key)
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise Reply(400, f"'{key}' must be a list of strings")
    prompts, completions = req["prompts"], req["completions"]
    n = len(completions)
    if len(prompts) != n:
        raise Reply(400, f"'prompts' has {len(prompts)} items but 'completions' has {n}")
    fields = req.get("fields")
    if fields is None:
        fields = {}
    if not isinstance(fields, dict):
        raise Reply(400, "'fields' must be an object of lists aligned with 'completions'")
    for k, v in fields.items():
        if k in _RESERVED:
            raise Reply(400, f"field name {k!r} is reserved")
        if not isinstance(v, list) or len(v) != n:
            got = f"{len(v)} items" if isinstance(v, list) else type(v).__name__
            raise Reply(400, f"field {k!r} must be a list of {n} items (one per completion), "
                             f"got {got}")
    return prompts, completions, fields
