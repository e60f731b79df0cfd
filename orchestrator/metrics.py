"""Metrics: mlflow (a sqlite store in the run directory unless the recipe names a tracking URI)
and a one-line-per-step console progress display."""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * len(SPARK)))] for v in values)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


def metric_name(key: str) -> str:
    """A metric key as mlflow accepts it (letters, digits, ``_-. /:``): ``@`` becomes ``_at_``,
    anything else odd (a bucket named "Counting & Probability") ``_``.

    >>> metric_name("eval/pass@8/type_Counting & Probability")
    'eval/pass_at_8/type_Counting _ Probability'
    """
    return re.sub(r"[^\w\-. /:]", "_", key.replace("@", "_at_"))


class Timings:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0


class _OneLine(logging.Handler):
    """mlflow's warnings and errors, each kind once, as a braid warning line."""

    def __init__(self, owner: RunLogger):
        super().__init__(logging.WARNING)
        self.owner = owner

    def emit(self, record: logging.LogRecord) -> None:
        lines = [ln.strip() for ln in record.getMessage().splitlines() if ln.strip()]
        cause = next((ln for ln in lines if re.search(r"\w+(Error|Exception)\b", ln)),
                     lines[0] if lines else "")
        self.owner.warn_once(f"logged an error ({record.name}): {cause[:300]}")


class RunLogger:
    def __init__(self, recipe, run_dir: Path):
        self.recipe, self.run_dir = recipe, run_dir
        self.mlflow = None
        self.run_id: str | None = None
        # the last step of each metric logged (after a resume: by the earlier attempts too).
        # A metric is logged once per step: an eval's metrics go out when it ends, not again
        # with its step's; the steps re-run since a checkpoint are not logged again (a resume
        # is exact: the re-run's values agree, but for timings)
        self.logged: dict[str, int] = {}
        self.failures: set[str] = set()  # the tracking store's failures, each said once
        self.uri = ""

    def start(self, recipe_yaml: str, run_id: str | None = None) -> None:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # only matters for file: URIs
        import mlflow

        # mlflow's own errors (its background logging thread's, its store's) as one line each,
        # said once, instead of its tracebacks
        log = logging.getLogger("mlflow")
        log.handlers, log.propagate = [_OneLine(self)], False

        default = f"sqlite:///{(self.run_dir / 'mlflow.db').resolve()}"
        uri = self.recipe.logging.mlflow_uri or default
        mlflow.set_tracking_uri(uri)
        name = self.recipe.logging.experiment
        if uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(name) is None:
            # artifacts beside the database, not in ./mlruns of whatever the cwd is
            where = Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts"
            mlflow.create_experiment(name, artifact_location=where.as_uri())
        mlflow.set_experiment(name)
        if run_id is not None:  # a resumed run continues its mlflow run
            run = mlflow.start_run(run_id=run_id)
            self.mlflow, self.run_id, self.uri = mlflow, run.info.run_id, uri
            client = mlflow.MlflowClient()
            self.logged = {key: max((m.step for m in client.get_metric_history(run_id, key)),
                                    default=-1)
                           for key in client.get_run(run_id).data.metrics}
            return
        run = mlflow.start_run(run_name=self.recipe.name)
        self.mlflow, self.run_id = mlflow, run.info.run_id
        params = flatten(self.recipe.model_dump(mode="json"))
        items = list(params.items())
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i:i + 100]))
        mlflow.log_text(recipe_yaml, "recipe.yaml")
        self.uri = uri

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.mlflow is not None:
            clean = {metric_name(k): float(v) for k, v in metrics.items()
                     if isinstance(v, (int, float))}
            clean = {k: v for k, v in clean.items() if step > self.logged.get(k, -1)}
            self.logged |= dict.fromkeys(clean, step)
            # queued, written by mlflow's background thread instead of inside the step;
            # flushed when a step checkpoints and when the run ends
            with self.guard(f"log step {step}"):
                self.mlflow.log_metrics(clean, step=step, synchronous=False)

    def flush(self) -> None:
        if self.mlflow is not None:
            with self.guard("flush its queued metrics"):
                self.mlflow.flush_async_logging()

    @contextmanager
    def guard(self, what: str):
        """The tracking store failing (a full disk, a server gone) costs the run its metrics,
        not the run: one line per kind of failure, not mlflow's tracebacks."""
        try:
            yield
        except Exception as err:
            lines = [ln for ln in str(err).splitlines() if ln.strip()]
            self.warn_once(f"could not {what} ({self.uri}): {type(err).__name__}: "
                           f"{lines[0] if lines else ''}")

    def warn_once(self, line: str) -> None:
        if line not in self.failures:
            self.failures.add(line)
            print(f"braid: warning: mlflow {line}", file=sys.stderr, flush=True)

    def note(self, message: str) -> None:
        """Something a user should see that is not a metric (a verifier's exception, dropped
        prompts): printed, and appended to ``<run_dir>/run.log`` (an mlflow artifact at the end)."""
        line = f"braid: {message}"
        print(line, flush=True)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "run.log", "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
        except OSError as err:  # a full disk: the note was printed
            print(f"braid: warning: {self.run_dir / 'run.log'}: {err}", file=sys.stderr,
                  flush=True)

    def console(self, step: int, total: int, kinds: str, m: dict[str, float]) -> None:
        parts = [f"step {step:>4}/{total}", f"{kinds:<7}"]
        if "reward/mean" in m:
            parts.append(f"reward {m['reward/mean']:.3f} pass {m['reward/pass_rate']:.2f} "
                         f"unsolved {m['prompts/zero_success_frac']:.2f}")
        if "rl/loss" in m:
            parts.append(f"rl_loss {m['rl/loss']:+.4f}")
        if "sft/loss" in m:
            parts.append(f"sft_loss {m['sft/loss']:.4f}")
        if "eval/accuracy" in m:
            parts.append(f"EVAL acc {m['eval/accuracy']:.3f}")
        times = " ".join(f"{k.split('/')[1]} {v:.2f}s" for k, v in m.items()
                         if k.startswith("time/"))
        parts.append(times + f" | v{int(m.get('weight_version', 0))}")
        print(" | ".join(parts), flush=True, file=sys.stdout)

    def finish(self, summary: dict, status: str = "FINISHED") -> None:
        if self.mlflow is not None:
            with self.guard("store the summary and run.log"):
                self.mlflow.log_dict(summary, "summary.json")
                if (self.run_dir / "run.log").is_file():
                    self.mlflow.log_artifact(str(self.run_dir / "run.log"))
            with self.guard(f"record the run's end as {status}"):
                self.mlflow.end_run(status=status)
            self.mlflow = None
