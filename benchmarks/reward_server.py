"""The reward server's throughput and latency, old (http.server) against new (FastAPI/uvicorn).

    .venv/bin/python benchmarks/reward_server.py [--seconds 3] [--rounds 2] [--batch 16]

Each server runs in a process of its own on 127.0.0.1 serving ``rewards.arithmetic:
exact_answer`` (a trivial verifier: string comparisons); each client is a process of its own
(as each reward worker's verifier process is in a run) calling its stack's ``RemoteVerifier``
on a batch of ``--batch`` samples in a loop. For 1, 8 and 64 concurrent clients it reports
requests/s and p50/p99 latency, and the transport's share of the p50: ``1 - (the same call in
process) / p50``. The old and new
stacks alternate cell by cell within each round, so drift on the machine hits both alike.

The old stack is the module as it was before the move, read from git
(``git show OLD:rewards/remote.py`` into a temporary folder) — kept for this benchmark only,
never imported by braid. Its client opens a connection per request (HTTP/1.0), the new one
keeps connections alive (httpx). Both servers get 64 slots and a 30 s queue timeout, so that
no cell measures queueing policy instead of the transport. Clients and servers share this
machine's cores: on a small machine the clients' own Python is part of each number.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from rewards.arithmetic import exact_answer  # noqa: E402

OLD = "1eb6a23"  # the last commit with the http.server reward server (rewards/remote.py)
CONCURRENCY = (1, 8, 64)
SERVER = """
import sys, time
sys.path[:0] = [{root!r}, {old_dir!r}]
from rewards.arithmetic import exact_answer
if {old!r}:
    import old_remote as remote
else:
    import rewards.remote as remote
srv = remote.serve({{"exact_answer": exact_answer}}, port=0, max_concurrency=64,
                   queue_timeout_s=30.0)
print(srv.url, flush=True)
time.sleep(10**6)
"""


def old_module(folder: Path):
    """The old rewards/remote.py from git, importable as ``old_remote`` from ``folder``."""
    text = subprocess.run(["git", "show", f"{OLD}:rewards/remote.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    path = folder / "old_remote.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("old_remote", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def start_server(old: bool, old_dir: Path) -> tuple[subprocess.Popen, str]:
    code = SERVER.format(root=str(ROOT), old_dir=str(old_dir), old=old)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def batch(n: int) -> tuple[list, list, dict]:
    prompts = [f"{i}+{i}=" for i in range(n)]
    completions = [str(2 * i) if i % 3 else "7" for i in range(n)]
    return prompts, completions, {"answer": [str(2 * i) for i in range(n)]}


def _client(verifier_cls, url: str, n: int, ready, go, stop_at, out) -> None:
    """One client process: calls the verifier in a loop until ``stop_at``."""
    prompts, completions, fields = batch(n)
    want = exact_answer(prompts, completions, **fields)
    v = verifier_cls(url, "exact_answer", timeout_s=30, retries=0)
    v(prompts, completions, **fields)  # warm: imports, a first connection
    latencies, bad = [], 0
    ready.wait()
    go.wait()
    while time.monotonic() < stop_at.value:
        t0 = time.monotonic()
        got = v(prompts, completions, **fields)
        latencies.append(time.monotonic() - t0)
        bad += got != want
    out.put((latencies, bad))


def measure(verifier_cls, url: str, clients: int, seconds: float, n: int) -> dict:
    """``clients`` processes (each a reward worker's verifier process, as in a run) calling
    the server for ``seconds``. Processes, not threads: client threads in one process would
    queue on its GIL and measure the client instead of the server."""
    ctx = mp.get_context("fork")
    ready, go = ctx.Barrier(clients + 1), ctx.Event()
    stop_at, out = ctx.Value("d", 0.0), ctx.Queue()
    procs = [ctx.Process(target=_client, args=(verifier_cls, url, n, ready, go, stop_at, out))
             for _ in range(clients)]
    for proc in procs:
        proc.start()
    ready.wait()  # every client warmed up
    t0 = time.monotonic()
    stop_at.value = t0 + seconds
    go.set()
    parts = [out.get(timeout=seconds + 120) for _ in procs]
    elapsed = time.monotonic() - t0
    for proc in procs:
        proc.join()
    return {"latencies": [x for lat, _ in parts for x in lat], "seconds": elapsed,
            "failures": sum(bad for _, bad in parts)}


def in_process_seconds(n: int, repeats: int = 2000) -> float:
    prompts, completions, fields = batch(n)
    t0 = time.perf_counter()
    for _ in range(repeats):
        exact_answer(prompts, completions, **fields)
    return (time.perf_counter() - t0) / repeats


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def table(results: dict, local_s: float) -> str:
    rows = ["| server | clients | requests/s | p50 ms | p99 ms | transport share of p50 | "
            "wrong or failed |", "|---|---:|---:|---:|---:|---:|---:|"]
    for (name, clients), runs in results.items():
        lat = [x for r in runs for x in r["latencies"]]
        rate = len(lat) / sum(r["seconds"] for r in runs)
        p50 = statistics.median(lat)
        rows.append(f"| {name} | {clients} | {rate:,.0f} | {p50 * 1e3:.2f} | "
                    f"{percentile(lat, 0.99) * 1e3:.2f} | {1 - local_s / p50:.1%} | "
                    f"{sum(r['failures'] for r in runs)} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0, help="per cell and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch", type=int, default=16, help="samples per request")
    args = p.parse_args()
    from rewards.remote import RemoteVerifier

    with tempfile.TemporaryDirectory() as tmp:
        old = old_module(Path(tmp))
        stacks = {"old (http.server, urllib)": (True, old.RemoteVerifier),
                  "new (FastAPI/uvicorn, httpx)": (False, RemoteVerifier)}
        procs, urls = [], {}
        try:
            for name, (is_old, _) in stacks.items():
                proc, urls[name] = start_server(is_old, Path(tmp))
                procs.append(proc)
            results: dict = {(name, c): [] for name in stacks for c in CONCURRENCY}
            for _ in range(args.rounds):
                for c in CONCURRENCY:
                    for name, (_, cls) in stacks.items():
                        results[(name, c)].append(
                            measure(cls, urls[name], c, args.seconds, args.batch))
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
    local_s = in_process_seconds(args.batch)
    print(f"batch of {args.batch} samples; the same call in process: {local_s * 1e6:.1f} us; "
          f"{args.rounds} round(s) of {args.seconds:g} s per cell\n")
    print(table(results, local_s))


if __name__ == "__main__":
    main()
