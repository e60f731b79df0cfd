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

The server is FastAPI on uvicorn (``server.py``), the client httpx (``client.py``), the command
line ``cli.py``. Protocol (JSON over HTTP/1.1, connections kept alive)::

    POST /score/<name>  {"prompts": [str, ...], "completions": [str, ...],
                         "fields": {"answer": [...], ...}}      "fields" optional, each list
                        -> 200 {"rewards": [number | null, ...]}  aligned with "completions"
    GET  /health        -> 200 {"status": "ok" | "degraded" | "saturated", "verifiers": [...],
                                "in_flight": k, "max_concurrency": m,
                                "slots": {name: {"status", "in_flight", "overdue",
                                                 "timed_out"}}}   never needs the token
    GET  /verifiers     -> 200 {"verifiers": [{"name": ..., "doc": ...}, ...]}

With a token (``$BRAID_REWARD_TOKEN`` or ``--token-file``; the command refuses to start without
one unless ``--no-auth``) every request but ``/health`` needs ``Authorization: Bearer
<token>``, checked as soon as the headers are in, before any body is read. Errors are
``{"error": "<message>"}`` with the status:

    400  the body is not JSON, is nested too deep, or breaks the schema (types, lists of
         different lengths); the verifier's signature cannot take the fields sent (a required
         one missing: named, with the verifier); framing that is ambiguous (Transfer-Encoding
         with Content-Length, conflicting Content-Lengths)
    401  missing or wrong bearer token
    404  unknown verifier or path; 405 wrong method; 411 no Content-Length
    408  the body did not arrive within ``request_timeout_s``
    413  body larger than ``max_body_bytes``
    500  the verifier raised (a one-line summary; the traceback is in the server's log) or
         returned something that is not one finite number or null per completion
    503  every slot of the verifier stayed busy for ``queue_timeout_s`` (with ``Retry-After``),
         or the server has ``max_connections`` open
    504  the verifier ran past ``timeout_s``

Limits: a connection must bring a request's headers within ``idle_timeout_s`` of opening or of
its last answer, and a request must be answered within ``request_timeout_s`` of its headers;
past ``max_connections`` open connections requests get 503. Each verifier has
``max_concurrency`` slots of its own, and its calls run in worker threads of its own: a call past
``timeout_s`` is answered 504 but cannot be killed, so it keeps its slot until it returns, and
``/health`` counts it (``overdue``): ``degraded`` while some verifier has such calls,
``saturated`` when they hold every slot of every verifier (restart the server). Verifiers must
be thread-safe, and CPU-bound ones share one core (the GIL): for more, run several servers
behind a load balancer.

Client: :class:`RemoteVerifier` splits a batch into chunks of ``batch_size``, sends up to
``max_concurrency`` at once, and retries connection errors, timeouts, 408, 429 and 5xx with
exponential backoff and jitter. A chunk still failing after ``retries`` retries scores None
(the reward worker counts those samples as failures) and logs a warning; a malformed answer
scores None per bad value. Any other 4xx is a bug in the setup (wrong name, token, fields) and
raises :class:`RemoteVerifierError` at once, naming the URL, status and the server's message.

>>> from rewards.arithmetic import exact_answer
>>> from rewards.remote import RemoteVerifier, serve
>>> server = serve({"exact_answer": exact_answer}, port=0)
>>> score = RemoteVerifier(server.url, "exact_answer")
>>> score(["1+1=", "2+2="], ["2", "5"], answer=["2", "4"])
[1.0, 0.0]
>>> server.shutdown()
"""

import importlib

TOKEN_ENV = "BRAID_REWARD_TOKEN"

_HOMES = {"RemoteVerifier": "client", "RemoteVerifierError": "client",
          "RewardServer": "server", "make_server": "server", "serve": "server",
          "add_cli_arguments": "cli", "build_verifiers": "cli", "cmd_serve_reward": "cli",
          "main": "cli"}
__all__ = ["TOKEN_ENV", *_HOMES]


def __getattr__(name: str):
    """The names above, imported on first use: every ``braid`` command builds serve-reward's
    parser, and few need FastAPI, uvicorn or httpx (0.5 s to import)."""
    if name not in _HOMES:
        raise AttributeError(f"module 'rewards.remote' has no attribute {name!r}")
    return getattr(importlib.import_module(f"rewards.remote.{_HOMES[name]}"), name)
