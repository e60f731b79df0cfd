"""Resolving a recipe into classes and arguments, and bringing a run up.

``resolve_recipe`` is what ``braid validate`` runs: every import path imported, every worker
class checked against its role's base class, every argument validated — no Ray, no engines.
``setup_controller`` then builds the model if the recipe asks for it, starts or joins Ray, places
the worker groups, runs every worker's ``setup()`` in parallel and forms the weight-sync group.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import Recipe, RecipeError, validate_model
from orchestrator.registry import resolve
from orchestrator.schedules import Schedule, build_schedule
from workers.base import ROLE_BASES


@dataclass
class Resolved:
    roles: dict[str, tuple[type, Any]]   # role -> (worker class, validated args)
    train: Any                           # dataset object
    eval: Any | None
    schedule: Schedule
    warnings: list[str]


def build_dataset(component, where: str):
    cls = resolve(component.cls, f"{where}.cls")
    args_model = getattr(cls, "Args", None)
    if args_model is not None:
        validate_model(args_model, component.args, f"{where}.args")
    try:
        return cls(**component.args)
    except TypeError as err:
        raise RecipeError(f"{where}.args: {err}") from None


def resolve_recipe(recipe: Recipe) -> Resolved:
    roles = {}
    warnings = []
    for role, base in ROLE_BASES.items():
        cfg = getattr(recipe.roles, role)
        if cfg is None:
            continue
        if role == "reference" and recipe.algorithm.kl == 0:
            warnings.append("roles.reference is not started: algorithm.kl is 0, so no loss "
                            "term needs reference log-probs")
            continue
        cls = resolve(cfg.cls, f"roles.{role}.cls", base=base)
        roles[role] = (cls, cls.check_args(cfg.args, f"roles.{role}.args"))
    if model_missing(recipe):
        # Not an error here: another recipe may produce it (recipes/repro/arm.yaml).
        warnings.append(f"model.path: no Hugging Face model at {recipe.model.path!r} yet "
                        "(and no model.build to create one)")
    train = build_dataset(recipe.data.train, "data.train")
    ev = build_dataset(recipe.data.eval, "data.eval") if recipe.data.eval else None
    schedule = build_schedule(recipe.schedule.policy, recipe.schedule.args)
    return Resolved(roles, train, ev, schedule, warnings)


def model_missing(recipe: Recipe) -> bool:
    model = Path(recipe.model.path)
    return recipe.model.build is None and not (model / "config.json").is_file()


def ensure_model(recipe: Recipe) -> None:
    path = Path(recipe.model.path)
    if (path / "config.json").is_file() or recipe.model.build is None:
        return
    from workers.models import build_tiny_model

    print(f"building a tiny model at {path} (model.build)", flush=True)
    build_tiny_model(path, recipe.model.build)


def init_ray(recipe: Recipe) -> bool:
    """Join the cluster named by the recipe or RAY_ADDRESS (as under `ray job submit`), else
    start a private local one. Returns True when the cluster is local and private."""
    import ray

    if ray.is_initialized():
        return False
    with _keep_sigterm_handler():
        return _init_ray(recipe)


@contextmanager
def _keep_sigterm_handler():
    """ray.init installs a SIGTERM handler that exits at once; keep braid's (a checkpoint
    first: orchestrator.recovery) when one is installed."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and callable(before):
            signal.signal(signal.SIGTERM, before)


def _init_ray(recipe: Recipe) -> bool:
    import ray

    address = recipe.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    roles = [r for r in (recipe.roles.rollout, recipe.roles.learner, recipe.roles.reward,
                         recipe.roles.reference, recipe.roles.teacher) if r is not None]
    need = sum(r.replicas * r.resources.num_cpus for r in roles)
    cpus = recipe.ray.num_cpus or max(os.cpu_count() or 1, math.ceil(need))
    here = os.getcwd()
    pythonpath = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, log_to_driver=True)
    return True


def setup_controller(c) -> None:
    import ray
    from transformers import AutoTokenizer

    from orchestrator.data import Cursor
    from orchestrator.demos import DemoStore
    from orchestrator.groups import WorkerGroup
    from orchestrator.metrics import RunLogger

    recipe = c.recipe
    resolved = resolve_recipe(recipe)
    if model_missing(recipe):
        raise RecipeError(next(w for w in resolved.warnings if w.startswith("model.path")))
    c.run_dir.mkdir(parents=True, exist_ok=True)
    ensure_model(recipe)
    c.tokenizer = AutoTokenizer.from_pretrained(recipe.model.path)
    c.cursor = Cursor(resolved.train, recipe.seed)
    c.eval_records = list(resolved.eval) if resolved.eval is not None else []
    c.schedule, c.demos = resolved.schedule, DemoStore(recipe.data.demo_budget)
    state = None
    if c.resume is not None:
        from orchestrator import checkpoint

        c.resume_path = checkpoint.find(c.run_dir, c.resume or None)
        state = checkpoint.read_state(c.resume_path)
    c.logger = RunLogger(recipe, c.run_dir)
    c.logger.start(c.recipe_yaml, run_id=state["mlflow_run_id"] if state else None)
    init_ray(recipe)
    # Engines log every weight reload at INFO, and DeepSpeed's calls into torch.distributed
    # warn on every collective; keep job logs to the progress lines unless asked otherwise.
    base_env = {"TOKENIZERS_PARALLELISM": "false",
                "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
                "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore::FutureWarning")}
    for role, (cls, args) in resolved.roles.items():
        cfg = getattr(recipe.roles, role)
        c.groups[role] = WorkerGroup(role, cfg, recipe, cls, args, base_env | cfg.env)
    for w in resolved.warnings:
        print(f"braid: note: {w}", flush=True)
    c.rollout, c.learner, c.reward = c.groups["rollout"], c.groups["learner"], c.groups["reward"]
    c.reference, c.teacher = c.groups.get("reference"), c.groups.get("teacher")

    addr, port = ray.get(c.learner.actors[0].master_address.remote())
    pending = [(c.learner, c.learner.fanout("setup", master_addr=addr, master_port=port))]
    pending += [(g, g.fanout("setup")) for r, g in c.groups.items() if r != "learner"]
    for group, refs in pending:
        group.call(refs, "setup")
    init_weight_sync(c)
    if state is not None:
        from orchestrator import checkpoint

        c.start_step = checkpoint.load(c, c.resume_path, state)
        print(f"resumed from {c.resume_path} at step {c.start_step}", flush=True)


def init_weight_sync(c) -> None:
    import ray

    ws = c.recipe.weight_sync
    backend = ws.backend
    if backend == "auto":
        backend = "nccl" if c.recipe.roles.learner.resources.num_gpus > 0 else "gloo"
    tp = c.recipe.roles.rollout.args.get("tensor_parallel_size", 1)
    world = 1 + len(c.rollout) * tp
    manifest = ray.get(c.learner.actors[0].weight_manifest.remote(int(ws.bucket_mb * 2**20)))
    host, port = ray.get(c.learner.actors[0].master_address.remote())
    refs = c.learner.fanout("init_weight_sync", host, port, world, manifest, backend)
    refs += [a.init_weight_sync.remote(host, port, world, 1 + i * tp, manifest, backend)
             for i, a in enumerate(c.rollout.actors)]
    c.learner.call(refs, "init_weight_sync")
