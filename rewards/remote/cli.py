"""``braid serve-reward``: serve verifiers named by import path, with a token from the
environment or a file (never needed on the command line, where ``ps`` shows it)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from core.errors import RecipeError
from core.registry import resolve
from rewards.remote import TOKEN_ENV

log = logging.getLogger("braid.reward.remote")


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
                   help="interface to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default 8000; 0 picks a free one")
    p.add_argument("--token-file", default=None, metavar="PATH",
                   help=f"read the bearer token from this file (default: ${TOKEN_ENV}); "
                        "without a token the server refuses to start")
    p.add_argument("--token", default=None,
                   help="the bearer token itself: avoid, a command line is visible to other "
                        f"users (use ${TOKEN_ENV} or --token-file)")
    p.add_argument("--no-auth", action="store_true",
                   help="serve without a token (refused on a non-loopback host unless "
                        "--insecure-network is also given)")
    p.add_argument("--insecure-network", action="store_true",
                   help="with --no-auth: allow a host other machines can reach")
    p.add_argument("--timeout-s", type=float, default=30.0,
                   help="per verifier call; past it the request answers 504 (default 30)")
    p.add_argument("--max-concurrency", type=int, default=8,
                   help="calls running at once, per verifier (default 8)")
    p.add_argument("--queue-timeout-s", type=float, default=1.0,
                   help="how long a request waits for a free slot before 503 (default 1)")
    p.add_argument("--max-body-mb", type=float, default=32.0,
                   help="largest request body; bigger ones get 413 (default 32)")
    p.add_argument("--request-timeout-s", type=float, default=60.0,
                   help="a request's whole time once its headers are in: body, queue and "
                        "verifier (default 60)")
    p.add_argument("--idle-timeout-s", type=float, default=10.0,
                   help="a connection that brings no complete request headers for this long "
                        "is closed (default 10)")
    p.add_argument("--max-connections", type=int, default=1000,
                   help="open connections past which requests get 503 (default 1000)")


def build_verifiers(specs: list[str], named: list[str], factory_args: list[str]) -> dict:
    """Resolve the command line's verifiers to ``{name: callable}``; RecipeError if bad."""
    paths = _verifier_paths(specs, named)
    kwargs = _factory_args(factory_args, paths)
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


def _verifier_paths(specs: list[str], named: list[str]) -> dict[str, str]:
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
    return paths


def _factory_args(items: list[str], paths: dict[str, str]) -> dict[str, dict]:
    kwargs: dict[str, dict] = {}
    for item in items:
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
    return kwargs


def resolve_token(args: argparse.Namespace) -> str | None:
    """The bearer token, or None with ``--no-auth``; RecipeError when neither is given, so that
    an unset variable never turns authentication off."""
    from rewards.remote.server import is_loopback

    env = os.environ.get(TOKEN_ENV)
    if args.no_auth:
        given = [f for f, v in (("--token-file", args.token_file), ("--token", args.token),
                                (f"${TOKEN_ENV}", env)) if v]
        if given:
            raise RecipeError(f"serve-reward: --no-auth, yet a token is given ({given[0]}): "
                              "drop one")
        if not is_loopback(args.host) and not args.insecure_network:
            raise RecipeError(f"serve-reward: --no-auth on {args.host}, which other machines "
                              "can reach: anyone there could run these verifiers. Set a token, "
                              "or add --insecure-network if this is intended")
        return None
    if args.token_file is not None and args.token is not None:
        raise RecipeError("serve-reward: give --token-file or --token, not both")
    if args.token_file is not None:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as err:
            raise RecipeError(f"serve-reward: --token-file {args.token_file}: {err}") from None
        where = f"--token-file {args.token_file}"
    elif args.token is not None:
        token, where = args.token.strip(), "--token"
    else:
        token, where = (env or "").strip(), f"${TOKEN_ENV}"
    if not token:
        raise RecipeError(f"serve-reward: no token ({where} is unset or empty): set "
                          f"${TOKEN_ENV} or give --token-file PATH; to serve without "
                          "authentication, pass --no-auth")
    return token


def cmd_serve_reward(args: argparse.Namespace) -> int:
    """``braid serve-reward``: serve until SIGTERM or SIGINT, then exit 0."""
    from rewards.remote.server import make_server  # FastAPI and uvicorn: only when serving

    verifiers = build_verifiers(args.verifiers, args.name, args.args)
    token = resolve_token(args)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    if args.token is not None:
        log.warning("--token puts the secret where `ps` shows it: prefer $%s or --token-file",
                    TOKEN_ENV)
    try:
        server = make_server(verifiers, args.host, args.port, timeout_s=args.timeout_s,
                             max_concurrency=args.max_concurrency,
                             queue_timeout_s=args.queue_timeout_s,
                             max_body_bytes=max(1, int(args.max_body_mb * (1 << 20))),
                             token=token, request_timeout_s=args.request_timeout_s,
                             idle_timeout_s=args.idle_timeout_s,
                             max_connections=args.max_connections,
                             insecure_network=args.insecure_network)
    except (ValueError, TypeError, OverflowError) as err:
        raise RecipeError(f"serve-reward: {err}") from None
    except OSError as err:
        print(f"braid: serve-reward: cannot listen on {args.host}:{args.port}: {err}",
              file=sys.stderr)
        return 1
    _serve_until_signal(server, token is not None)
    log.info("stopped")
    return 0


def _serve_until_signal(server, with_token: bool) -> None:
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        if not with_token:
            log.warning("serving WITHOUT authentication (--no-auth)")
        # logged before start: the socket listens already, and the first request may come now
        log.info("serving %s on %s (timeout %gs, %d at once per verifier%s)",
                 ", ".join(sorted(server.verifiers)), server.url, server.timeout_s,
                 server.max_concurrency, ", token required" if with_token else "")
        server.start()
        while not stop.wait(1.0):
            pass
    finally:
        server.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
