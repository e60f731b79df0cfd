"""braid — command line.

    braid validate RECIPE [key.sub=value ...]   check a recipe without starting Ray
    braid run RECIPE [key.sub=value ...]        run it (locally, or on the cluster in RAY_ADDRESS)
    braid run RECIPE --resume [DIR]             continue from the latest checkpoint

Exit status: 0 success, 2 a recipe error (one line naming the field), 1 a run that failed.
"""

from __future__ import annotations

import argparse
import sys


def _load(args):
    from orchestrator.config import load_recipe

    return load_recipe(args.recipe, args.overrides)


def cmd_validate(args) -> int:
    from orchestrator.setup import resolve_recipe

    recipe = _load(args)
    resolved = resolve_recipe(recipe)
    roles = ", ".join(f"{r}={cls.__module__}:{cls.__name__}"
                      for r, (cls, _) in resolved.roles.items())
    print(f"{args.recipe}: ok ({recipe.name}: {recipe.steps} steps; {roles}; "
          f"schedule={recipe.schedule.policy})")
    for w in resolved.warnings:
        print(f"  warning: {w}")
    return 0


def cmd_run(args) -> int:
    from omegaconf import OmegaConf

    from orchestrator.config import RecipeError
    from orchestrator.controller import Controller
    from orchestrator.groups import WorkerError

    recipe = _load(args)
    text = OmegaConf.to_yaml(OmegaConf.create(recipe.model_dump(mode="json")))
    controller = Controller(recipe, text, resume=args.resume)
    status = "FAILED"
    try:
        controller.setup()
        controller.run()
        status = "FINISHED"
        return 0
    except RecipeError:
        raise
    except WorkerError as err:
        print(f"braid: run failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        status = "KILLED"
        print("braid: interrupted", file=sys.stderr)
        return 130
    finally:
        controller.shutdown(status)


def main(argv: list[str] | None = None) -> int:
    from orchestrator.config import RecipeError

    parser = argparse.ArgumentParser(prog="braid", description="braid SFT and RL in one run")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_ in (("validate", cmd_validate, "check a recipe without starting Ray"),
                            ("run", cmd_run, "run a recipe")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("recipe", help="path to the recipe YAML")
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
        if name == "run":
            p.add_argument("--resume", nargs="?", const="", default=None, metavar="DIR",
                           help="continue from a checkpoint: DIR is a checkpoint or a run "
                                "directory (default: this recipe's run directory)")
        p.set_defaults(fn=fn)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except RecipeError as err:
        print(f"braid: recipe error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
