"""Metrics: mlflow (a sqlite store in the run directory unless the recipe names a tracking URI)
and a one-line-per-step console progress display."""

from __future__ import annotations

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

    def start(self, recipe_yaml: str, run_id: str | None = None) -> None:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # only matters for file: URIs
        import mlflow

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
            self.mlflow.log_metrics(clean, step=step, synchronous=False)

    def flush(self) -> None:
        if self.mlflow is not None:
            self.mlflow.flush_async_logging()

    def note(self, message: str) -> None:
        """Something a user should see that is not a metric (a verifier's exception, dropped
        prompts): printed, and appended to ``<run_dir>/run.log`` (an mlflow artifact at the end)."""
        line = f"braid: {message}"
        print(line, flush=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "run.log", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

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
            self.mlflow.log_dict(summary, "summary.json")
            if (self.run_dir / "run.log").is_file():
                self.mlflow.log_artifact(str(self.run_dir / "run.log"))
            self.mlflow.end_run(status=status)
            self.mlflow = None
