"""Resolving a recipe into classes and arguments, and bringing a run up.

``resolve_recipe`` is what ``braid validate`` runs: every import path imported, every worker
class checked against its role's base class, every argument validated — no Ray, no engines.
``setup_controller`` then builds the model if the recipe asks for it, starts or joins Ray, places
the worker groups, runs every worker's ``setup()`` in parallel and forms the weight-sync group.
"""

from __future__ import annotations

import itertools
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import MissingInput, RecipeError, validate_model
from core.registry import resolve, user_code
from orchestrator.config import Recipe
from orchestrator.data import dataset_size
from orchestrator.groups import WorkerError
from orchestrator.pipeline import check_schedule
from orchestrator.schedules import Schedule, build_schedule
from workers.base import ROLE_BASES


@dataclass
class Resolved:
    roles: dict[str, tuple[type, Any]]   # role -> (worker class, validated args)
    train: Any                           # dataset object
    eval: Any | None
    schedule: Schedule
    warnings: list[str]
    notes: list[str] = field(default_factory=list)  # what was checked, for `braid validate`
    prompts: dict[str, Any] = field(default_factory=dict)  # role -> its PromptFormatter
    memory: list = field(default_factory=list)  # each role's Estimate (orchestrator/memory.py)


def build_dataset(component, where: str):
    cls = resolve(component.cls, f"{where}.cls")
    args_model = getattr(cls, "Args", None)
    if args_model is not None:
        validate_model(args_model, component.args, f"{where}.args")
    with user_code(where, component.cls):
        return cls(**component.args)


def check_environment(cfg) -> None:
    """The environment class resolves and takes ``environment.args``; the tool parser exists."""
    import inspect

    cls = resolve(cfg.cls, "environment.cls")
    for name in ("reset", "step"):
        if not callable(getattr(cls, name, None)):
            raise RecipeError(f"environment.cls: {cfg.cls} has no {name}() "
                              "(workers/agent/env.py: reset, step, close)")
    try:
        inspect.signature(cls).bind(**cfg.args)
    except TypeError as err:
        raise RecipeError(f"environment.args: {err} ({cfg.cls})") from None
    with user_code("environment", cfg.cls):  # its tools, verifiers, files: named now
        cls(**cfg.args)
    if cfg.tool_parser:
        try:
            from vllm.tool_parsers import ToolParserManager
        except ImportError:  # validating away from the engines: checked at set-up
            return
        try:
            ToolParserManager.get_tool_parser(cfg.tool_parser)
        except KeyError:
            raise RecipeError(f"environment.tool_parser: vLLM has no tool parser "
                              f"{cfg.tool_parser!r}") from None


def first_records(dataset, where: str, path: str, n: int = 8) -> list[dict]:
    """The first records of a dataset, each checked for what braid needs (``id``, ``prompt``)."""
    with user_code(where, path):
        if iter(dataset) is dataset:
            raise RecipeError(f"{where}: {path} gives a one-shot iterator; a dataset must be "
                              "iterable again (each pass, each resume): a class with __iter__")
        records = list(itertools.islice(iter(dataset), n))
    if not records:
        raise RecipeError(f"{where}: {path} yields no records")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise RecipeError(f"{where}: record {i} of {path} is a {type(r).__name__}, not a "
                              "mapping of fields")
        for key in ("id", "prompt"):
            if r.get(key) in (None, ""):
                raise RecipeError(f"{where}: record {i} of {path} has no {key!r} (fields: "
                                  f"{', '.join(r) or 'none'})")
    return records


def model_problem(path: str | Path) -> str | None:
    """What keeps ``path`` from being a Hugging Face model folder, or None: a config, weights
    and a tokenizer."""
    p = Path(path)
    if not p.is_dir():
        return "no such folder"
    if not (p / "config.json").is_file():
        return "no config.json"
    if not any(p.glob("*.safetensors")) and not any(p.glob("pytorch_model*.bin")):
        return "no weights (*.safetensors or pytorch_model*.bin)"
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json",
                                           "tokenizer_config.json")):
        return "no tokenizer (tokenizer.json, tokenizer.model or vocab.json)"
    return None


def model_folders(recipe: Recipe, roles: dict) -> dict[str, str]:
    """Recipe field -> model folder, for every model the run loads."""
    out = {}
    if recipe.model.build is None or (Path(recipe.model.path) / "config.json").is_file():
        out["model.path"] = recipe.model.path
    for role, (_, args) in roles.items():
        model = getattr(args, "model", None)
        if isinstance(model, str):
            out[f"roles.{role}.args.model"] = model
    return out


def prompt_budget(recipe: Recipe, rollout_args) -> int | None:
    """prompt.max_prompt_tokens, else the engine's max_model_len less the longest generation."""
    max_len = getattr(rollout_args, "max_model_len", None)
    explicit = recipe.prompt.max_prompt_tokens
    if max_len is None:
        return explicit
    if explicit is not None:
        if explicit >= max_len:
            raise RecipeError(f"prompt.max_prompt_tokens = {explicit} does not fit the engine's "
                              f"max_model_len = {max_len} (a prompt needs room to be answered)")
        return explicit
    longest = max(recipe.sampling.max_tokens, recipe.eval.max_tokens or 0)
    if longest >= max_len:
        raise RecipeError(f"sampling.max_tokens (or eval.max_tokens) = {longest} leaves no room "
                          f"for a prompt in the engine's max_model_len = {max_len}")
    return max_len - longest


def check_run_dir(run_dir: str) -> None:
    """run_dir can be made and written: its nearest existing folder is a writable folder."""
    path = Path(run_dir).expanduser().resolve()
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise RecipeError(f"run_dir: cannot make {run_dir!r}: {str(parent)!r} is a file")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise RecipeError(f"run_dir: cannot write under {str(parent)!r} (permission "
                                  f"denied) to make {run_dir!r}")
            return


class MlflowUnreachable(RecipeError):
    """logging.mlflow_uri names a tracking server that does not answer."""


def preflight(recipe: Recipe) -> None:
    """What a run needs of its surroundings, checked before anything starts (Ray included):
    a run directory it can make, a tracking server that answers."""
    check_run_dir(recipe.run_dir)
    problem = mlflow_problem(recipe.logging.mlflow_uri)
    if problem:
        raise MlflowUnreachable(f"logging.mlflow_uri: {problem}")


def mlflow_problem(uri: str | None) -> str | None:
    """Why the tracking server at an http(s) ``logging.mlflow_uri`` cannot be reached, or None
    (other URIs — a sqlite file, databricks — are not probed)."""
    if not uri or not uri.startswith(("http://", "https://")):
        return None
    import requests

    # the TLS settings mlflow's own client honours (REQUESTS_CA_BUNDLE too, by requests)
    verify: bool | str = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or True
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        verify = False
    try:
        requests.get(uri.rstrip("/") + "/health", timeout=5.0, verify=verify)
    except Exception as err:  # refused, unresolvable, TLS, a malformed URL: all say the same
        text = str(err).splitlines()[0] if str(err) else ""
        return f"no tracking server answers at {uri} ({type(err).__name__}: {text[:200]})"
    return None


def resolve_recipe(recipe: Recipe, skip_model: bool = False, skip_data: bool = False,
                   skip_mlflow: bool = False, check_surroundings: bool = True) -> Resolved:
    """Everything ``braid validate`` checks — and ``braid run`` checks first: import paths,
    worker classes and arguments, the schedule, the datasets' first records (and their size
    against prompts_per_step), every model folder and the prompts its tokenizer makes (the
    formatters come back in ``prompts``). A model folder or data file that is not on this
    machine is an error (MissingInput), unless ``skip_model`` / ``skip_data`` (``braid
    validate --skip-model / --skip-data``, checking a recipe away from its cluster) turn
    exactly that into a warning — and what needs it is not checked; so is a tracking server
    that does not answer (``skip_mlflow``; not asked again with ``check_surroundings``
    False: set-up's preflight asked before Ray started), and a run_dir braid cannot make."""
    roles = {}
    warnings: list[str] = []
    for role, base in ROLE_BASES.items():
        cfg = getattr(recipe.roles, role)
        if cfg is None:
            continue
        if role == "reference" and recipe.algorithm.kl == 0:
            warnings.append("roles.reference is not started: algorithm.kl is 0, so no loss "
                            "term needs reference log-probs")
            continue
        if role == "learner" and recipe.model.lora is not None and recipe.model.lora.dropout:
            warnings.append("model.lora.dropout > 0: the learner's log-probs of an RL update "
                            "are taken with dropout and the engines' without, so the "
                            "importance ratio carries the dropout's noise (0 is usual for RL)")
        if role == "reference" and recipe.model.lora is not None:
            warnings.append("roles.reference is not started: with model.lora the learner, its "
                            "adapters disabled, gives the reference log-probs")
            continue
        if role == "critic" and recipe.algorithm.advantage != "gae":
            warnings.append(f"roles.critic is not started: algorithm.advantage is "
                            f"{recipe.algorithm.advantage!r}, not gae, so no values are used")
            continue
        cls = resolve(cfg.cls, f"roles.{role}.cls", base=base)
        roles[role] = (cls, cls.check_args(cfg.args, f"roles.{role}.args"))
    if recipe.environment is not None:
        check_environment(recipe.environment)
        reward_cls = roles["reward"][0]
        from workers.reward import RuleRewardWorker

        if not issubclass(reward_cls, RuleRewardWorker):
            raise RecipeError(f"roles.reward.cls: {recipe.roles.reward.cls} does not read an "
                              "environment's rewards; with an environment the reward role is "
                              "workers.reward:RuleRewardWorker (its verifiers add to them)")
        if getattr(roles["reward"][1], "verifiers", None) == [] and \
                recipe.schedule.policy == "luffy":
            raise RecipeError("roles.reward.args.verifiers: none given, but LUFFY's "
                              "demonstrations are scored by verifiers, not by the "
                              "environment: name the verifier that scores a final answer")
    elif getattr(roles["reward"][1], "verifiers", None) == []:
        raise RecipeError("roles.reward.args.verifiers: none given, and no environment scores "
                          "the samples: name at least one verifier")
    template = recipe.prompt.chat_template
    if template and not Path(template).expanduser().is_file():
        raise RecipeError(f"prompt.chat_template: no such file: {template!r} (relative paths "
                          f"start at the working directory, {os.getcwd()})")

    def absent(err: RecipeError, skipped: bool, flag: str) -> None:
        """A model folder or data file this machine lacks: an error, or with ``flag`` a
        warning (and what needs it goes unchecked)."""
        if not skipped:
            raise type(err)(f"{err} (`braid validate {flag}` checks a recipe away from the "
                            "machine that has it)") from None
        warnings.append(f"{err} — not checked ({flag}); `braid run` needs it")

    try:
        check_run_dir(recipe.run_dir)
    except RecipeError as err:  # a cluster volume this machine may not have or may not write
        absent(err, skip_data, "--skip-data")
    if check_surroundings:
        problem = mlflow_problem(recipe.logging.mlflow_uri)
        if problem:
            absent(MlflowUnreachable(f"logging.mlflow_uri: {problem}"), skip_mlflow,
                   "--skip-mlflow")
    datasets: dict[str, Any] = {}
    for where, component in (("data.train", recipe.data.train), ("data.eval", recipe.data.eval)):
        if component is not None:
            try:
                datasets[where] = build_dataset(component, where)
            except MissingInput as err:
                absent(err, skip_data, "--skip-data")
    samples = {where: first_records(ds, where, getattr(recipe.data, where[5:]).cls)
               for where, ds in datasets.items()}
    size = dataset_size(datasets.get("data.train"))
    if size is not None and size < recipe.data.prompts_per_step:
        warnings.append(f"data.prompts_per_step = {recipe.data.prompts_per_step} is larger "
                        f"than data.train ({size} records): a step repeats prompts")
    warnings += check_algorithm(recipe)
    schedule = build_schedule(recipe.schedule.policy, recipe.schedule.args)
    check_schedule(schedule, recipe.rollout.max_staleness, recipe.schedule.policy)
    warnings += schedule_warnings(recipe)
    notes = [f"{where}: {dataset_size(ds) or 'a stream of'} records"
             for where, ds in datasets.items()]
    budgets = {role: prompt_budget(recipe, roles[role][1])
               for role in ("rollout", "teacher") if role in roles}
    key = recipe.eval.bucket_key
    if key and "data.eval" in samples and all(key not in r for r in samples["data.eval"]):
        warnings.append(f"eval.bucket_key: none of the first eval records has a field "
                        f"{key!r}: every one would land in one bucket")
    prompts = {}
    models = model_folders(recipe, roles)
    for where, folder in models.items():
        problem = model_problem(folder)
        if problem == "no such folder":
            absent(MissingInput(f"{where}: no model folder at {folder!r}"), skip_model,
                   "--skip-model")
        elif problem:
            absent(RecipeError(f"{where}: {folder!r} is not a Hugging Face model folder "
                               f"({problem})"), skip_model, "--skip-model")
    tokenizers = {"rollout": models.get("model.path"),
                  "teacher": models.get("roles.teacher.args.model", models.get("model.path"))}
    for role, folder in tokenizers.items():
        if role in roles and folder and model_problem(folder) is None:
            who = "teacher " if role == "teacher" else ""
            prompts[role] = formatter(recipe, folder, budgets[role], who)
            notes += check_prompts(prompts[role], samples, who)
        elif role in roles:
            why = ("the model is built when the run starts (model.build)"
                   if recipe.model.build is not None else "no model folder here (--skip-model)")
            notes.append(f"{'teacher ' if role == 'teacher' else ''}prompts not tokenised: "
                         f"{why}")
    memory = estimate_memory(recipe, roles, models)
    if memory:
        from orchestrator.memory import summary

        notes.append(summary(memory))
    return Resolved(roles, datasets.get("data.train"), datasets.get("data.eval"), schedule,
                    warnings, notes, prompts, memory)


def estimate_memory(recipe: Recipe, roles: dict, models: dict[str, str]) -> list:
    """Each role's host-memory estimate (orchestrator/memory.py), when the model folders it
    needs are here (none otherwise: what is not here was not checked)."""
    from orchestrator.memory import estimate_roles, parameters, spec_parameters

    def counted(folder: str):
        try:  # a config transformers cannot build as a causal LM: no estimate for it
            return parameters(folder)
        except Exception:  # noqa: BLE001
            return None

    policy = models.get("model.path")
    if policy and not model_problem(policy):
        model = counted(policy)
    elif recipe.model.build is not None:
        model = spec_parameters(recipe.model.build)
    else:
        return []
    if model is None:
        return []
    # a role's own model only counts where it is one the estimate uses (a teacher's engine);
    # a reward model's is in its process overhead
    others = {role: n for role in roles if role in ("teacher", "rollout", "reference")
              and (folder := models.get(f"roles.{role}.args.model"))
              and not model_problem(folder) and (n := counted(folder)) is not None}
    return estimate_roles(recipe, roles, model, others)


def check_algorithm(recipe: Recipe) -> list[str]:
    """The advantage estimator and policy loss resolve; what they will do with this sampling."""
    from orchestrator.advantages import GROUP_BASELINE, estimator
    from workers.learner.losses import policy_loss

    a = recipe.algorithm
    if a.advantage != "gae":  # gae: the critic's values (orchestrator/advantages.py: gae)
        estimator(a.advantage)
    policy_loss(a.policy_loss)
    warned = []
    if recipe.sampling.n == 1 and a.advantage in GROUP_BASELINE:
        warned.append(f"sampling.n = 1 with algorithm.advantage {a.advantage!r}: every group "
                      "is one sample, so there is no group baseline and its advantage is its "
                      "raw reward (REINFORCE without a baseline); sample n >= 2, or use "
                      "reinforce_pp")
    if a.clip is None and a.tis_cap is None:
        warned.append("algorithm.clip is null and tis_cap is null: the ratio to vLLM's "
                      "behaviour log-probs is unbounded (up to e^log_ratio_clamp) wherever "
                      "the engine and the learner disagree; set tis_cap (ratio 1, truncated "
                      "importance weight) or a clip")
    policies = {recipe.schedule.policy} | {str(p.get("policy")) for p in
                                            recipe.schedule.args.get("phases", [])
                                            if isinstance(p, dict)}
    if a.advantage == "gae" and "luffy" in policies:
        raise RecipeError("algorithm.advantage gae with the luffy schedule: the critic has no "
                          "values for the demonstrations in a group; use a group-baseline "
                          "estimator such as grpo")
    if a.dynamic_sampling and (a.advantage not in GROUP_BASELINE or "luffy" in policies):
        luffy = " and luffy (a demonstration gives its group signal)" \
            if "luffy" in policies else ""
        warned.append(f"algorithm.dynamic_sampling keeps only groups whose samples' rewards "
                      f"differ — what a group baseline needs; with advantage "
                      f"{a.advantage!r}{luffy} it discards groups that carry signal")
    if a.policy_loss == "gspo" and ((a.clip or 0) > 0.01 or a.loss_agg != "seq_mean_token_mean"):
        warned.append("algorithm.policy_loss gspo: the paper clips its sequence ratio at "
                      "~3e-4 / 4e-4 (clip, clip_high) and averages over sequences (loss_agg: "
                      f"seq_mean_token_mean); this recipe has clip {a.clip}, {a.loss_agg}")
    return warned


def schedule_warnings(recipe: Recipe) -> list[str]:
    s = recipe.schedule
    if s.policy != "phases":
        return []
    total = sum(int(p.get("steps", 0)) for p in s.args.get("phases", []))
    if total < recipe.steps:
        return [f"schedule.args.phases cover {total} steps of {recipe.steps}: the last phase "
                f"runs on for the remaining {recipe.steps - total}"]
    if total > recipe.steps:
        return [f"schedule.args.phases cover {total} steps, more than steps = {recipe.steps}: "
                "later phases never run"]
    return []


def formatter(recipe: Recipe, model: str, budget: int | None, who: str = ""):
    """The PromptFormatter of a model folder; a prompt section it cannot serve is a
    RecipeError."""
    from orchestrator.prompts import PromptError, PromptFormatter

    try:
        return PromptFormatter.for_model(model, recipe, budget)
    except (PromptError, OSError) as err:
        raise RecipeError(f"prompt: {who}{err}") from None


def check_prompts(fmt, samples: dict[str, list[dict]], who: str = "") -> list[str]:
    """Format the first records with a model's formatter: template fields and lengths."""
    from orchestrator.prompts import PromptError

    budget = fmt.max_prompt_tokens
    notes = [f"{who}prompt: {'chat template' if fmt.chat else 'plain text'}, stop tokens "
             f"{fmt.stop_token_ids}, at most {budget or 'any number of'} prompt tokens"]
    for where, records in samples.items():
        try:
            lengths = [len(fmt.prompt_ids(r)) for r in records]
            for r in records:  # multi-turn ones rendered message by message, as SFT will
                if r.get("demonstration") is not None:
                    fmt.demonstration(r)
        except (PromptError, TypeError, KeyError, AttributeError) as err:
            raise RecipeError(f"prompt: {who}{where}: {err}") from None
        long = sum(budget is not None and n > budget for n in lengths)
        notes.append(f"{who}{where}: first {len(records)} prompts are "
                     f"{min(lengths)}-{max(lengths)} tokens"
                     + (f"; {long} longer than {budget} would be dropped" if long else ""))
    return notes


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
        private = _init_ray(recipe)
    # A group call raises its first failure at once (orchestrator/groups.py) and leaves its
    # peers' results unread: Ray would print each as an "unhandled error" traceback. Set in
    # the driver after the cluster started, so that its workers do not inherit it.
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    return private


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
                         recipe.roles.reference, recipe.roles.teacher, recipe.roles.critic)
             if r is not None]
    need = sum(r.replicas * r.resources.num_cpus for r in roles)
    have = os.cpu_count() or 1
    cpus = recipe.ray.num_cpus or max(have, math.ceil(need))
    if cpus > have:
        print(f"braid: warning: the roles ask for {need:g} CPUs and this machine has {have}; "
              f"the private Ray cluster counts {cpus}, so actors share cores (slower, and "
              "more memory than the cores suggest)", flush=True)
    here = os.getcwd()
    pythonpath = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, log_to_driver=True)
    return True


def setup_controller(c) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import ray

    from orchestrator.groups import Deadlines, WorkerGroup, check_capacity
    from orchestrator.metrics import RunLogger
    from orchestrator.recovery import set_up

    recipe = c.recipe
    preflight(recipe)
    ensure_model(recipe)
    # Ray's start (process launches, seconds) overlaps checking the recipe against the model's
    # tokenizer and building the controller's state
    with ThreadPoolExecutor(1, thread_name_prefix="braid-setup") as pool:
        prepared = pool.submit(prepare_driver, c)
        try:
            init_ray(recipe)
        except Exception:
            prepared.result()  # an error in the recipe is the one to report
            raise
        resolved, state = prepared.result()
    c.logger = RunLogger(recipe, c.run_dir)  # here: mlflow's active run belongs to its thread
    c.logger.start(c.recipe_yaml, run_id=state["mlflow_run_id"] if state else None)
    # Engines log every weight reload at INFO, and DeepSpeed's calls into torch.distributed
    # warn on every collective; keep job logs to the progress lines unless asked otherwise.
    base_env = {"TOKENIZERS_PARALLELISM": "false",
                "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
                "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore::FutureWarning")}
    # a cluster that lost a node may get it back (KubeRay replaces an evicted pod): wait then
    nodes = ray.nodes()
    check_capacity({role: getattr(recipe.roles, role) for role in resolved.roles},
                   [n["Resources"] for n in nodes if n["Alive"]],
                   recipe.ray.autoscaling or not all(n["Alive"] for n in nodes))
    for role, (cls, args) in resolved.roles.items():
        cfg = getattr(recipe.roles, role)
        c.groups[role] = WorkerGroup(role, cfg, recipe, cls, args, base_env | cfg.env)
    for w in resolved.warnings + check_memory(c.groups, resolved.memory,
                                              recipe.ray.memory_check):
        print(f"braid: note: {w}", flush=True)
    c.rollout, c.learner, c.reward = c.groups["rollout"], c.groups["learner"], c.groups["reward"]
    c.reference, c.teacher = c.groups.get("reference"), c.groups.get("teacher")
    c.critic = c.groups.get("critic")

    pending = []
    for group in (c.learner, c.critic):  # each its own torch.distributed world
        if group is not None:
            addr, port = group.call([group.actors[0].master_address.remote()],
                                    "master_address")[0]
            pending.append((group, group.fanout("setup", master_addr=addr, master_port=port)))
    pending += [(g, g.fanout("setup")) for r, g in c.groups.items()
                if r not in ("learner", "critic")]
    for group, refs in pending:
        set_up(c, group, refs)
    init_weight_sync(c)
    if state is not None:
        from orchestrator import checkpoint

        c.start_step = checkpoint.load(c, c.resume_path, state)
        print(f"resumed from {c.resume_path} at step {c.start_step}", flush=True)
        logged = max(c.logger.logged.values(), default=-1)
        if logged > c.start_step:
            print(f"braid: note: mlflow holds steps up to {logged} from the earlier attempt; "
                  f"steps {c.start_step + 1}-{logged} run again but are not logged again",
                  flush=True)
    if recipe.failures.deadline is not None:  # set-up (model loads, compiles) has none
        for role, group in c.groups.items():
            group.deadlines = Deadlines(recipe.failures.deadline, role)


def check_memory(groups: dict, estimates: list, mode: str = "refuse") -> list[str]:
    """Once every group is placed and before any worker sets up (loads a model): the memory
    each node's share of the roles needs against what the node has. A node that cannot hold
    its share fails the run now (``ray.memory_check: refuse``), naming the roles and the
    numbers, or is warned about (``warn``); warnings for tight ones."""
    import ray
    from ray.util import placement_group_table

    from orchestrator.memory import check_placement, summary

    if not estimates or mode == "off":
        return []
    print(f"braid: {summary(estimates)}", flush=True)
    placed = {role: [node for _, node in sorted(
        placement_group_table(g.pg)["bundles_to_node_id"].items())]
        for role, g in groups.items()}
    nodes = {n["NodeID"]: (n["Resources"].get("memory", 0) +
                           n["Resources"].get("object_store_memory", 0)) / 2**30
             for n in ray.nodes() if n["Alive"]}
    try:
        return check_placement(estimates, placed, nodes, ray.get_runtime_context().get_node_id())
    except MemoryError as err:
        if mode == "warn":
            return [f"{err} (ray.memory_check: warn)"]
        raise WorkerError(f"the cluster cannot hold this recipe: {err}. Lower the roles' memory "
                          "(docs/cluster.md#memory), place them on larger nodes, or set "
                          "ray.memory_check: warn", "memory") from None


def prepare_driver(c):
    """The resolved recipe, the controller's own state — prompts, data cursor, eval set,
    schedule, demonstrations, the rollout pipeline — and the checkpoint to resume from, if any."""
    from orchestrator.data import Cursor
    from orchestrator.demos import DemoStore
    from orchestrator.pipeline import RolloutPipeline
    from orchestrator.recovery import restarts_so_far

    recipe = c.recipe
    resolved = resolve_recipe(recipe, check_surroundings=False)  # preflight asked
    c.run_dir.mkdir(parents=True, exist_ok=True)
    c.prompts, c.teacher_prompts = resolved.prompts["rollout"], resolved.prompts.get("teacher")
    c.cursor = Cursor(resolved.train, recipe.seed, keep=c.prompts.fits)
    records = list(resolved.eval) if resolved.eval is not None else []
    c.eval_records = [r for r in records if c.prompts.fits(r)]
    if len(c.eval_records) < len(records):
        print(f"braid: note: data.eval: {len(records) - len(c.eval_records)} of {len(records)} "
              f"prompts are longer than {c.prompts.max_prompt_tokens} tokens and left out",
              flush=True)
    c.schedule = resolved.schedule
    c.demos = DemoStore(recipe.data.demo_budget, getattr(resolved.train, "by_id", None))
    c.rollouts = RolloutPipeline(c)
    state = None
    if c.resume is not None:
        from orchestrator import checkpoint

        c.resume_path = checkpoint.find(c.run_dir, c.resume or None)
        state = checkpoint.read_state(c.resume_path)
        c.restarts = restarts_so_far(c.run_dir, state.get("mlflow_run_id"))  # per run
    else:
        (c.run_dir / "restarts.json").unlink(missing_ok=True)  # a new run in this folder
    return resolved, state


def init_weight_sync(c) -> None:
    ws = c.recipe.weight_sync
    backend = ws.backend
    if backend == "auto":
        backend = "nccl" if c.recipe.roles.learner.resources.num_gpus > 0 else "gloo"
    tp = c.recipe.roles.rollout.args.get("tensor_parallel_size", 1)
    world = 1 + len(c.rollout) * tp
    first = c.learner.actors[0]
    manifest, (host, port) = c.learner.call(
        [first.weight_manifest.remote(int(ws.bucket_mb * 2**20)), first.master_address.remote()],
        "weight_manifest")
    refs = c.learner.fanout("init_weight_sync", host, port, world, manifest, backend)
    recv = [a.init_weight_sync.remote(host, port, world, 1 + i * tp, manifest, backend)
            for i, a in enumerate(c.rollout.actors)]
    c.rollout.await_with(recv, refs, "init_weight_sync", ws.timeout_s)
    c.learner.call(refs, "init_weight_sync")
    c.rollout.call(recv, "init_weight_sync")
