"""Import-path lookups: every swappable piece of a recipe is named `module:Name`.

The job's working directory is importable, so a user's own module next to the recipe (or shipped
with `ray job submit --working-dir .`) resolves like a built-in.
"""

from __future__ import annotations

import importlib
import os
import sys
from contextlib import contextmanager
from typing import Any

from core.errors import DataError, DataMissing, MissingInput, RecipeError, user_frame


def resolve(path: str, where: str, base: type | None = None,
            aliases: dict[str, str] | None = None) -> Any:
    """Import `module:Name` (or a built-in alias); `where` is the recipe field, for errors."""
    target = (aliases or {}).get(path, path)
    if ":" not in target:
        hint = f" or one of {sorted(aliases)}" if aliases else ""
        raise RecipeError(f"{where}: expected an import path 'module:Name'{hint}, got {path!r}")
    module_name, _, attr = target.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise RecipeError(f"{where}: no module named {err.name!r} (from {path!r})") from None
        raise RecipeError(f"{where}: importing {module_name!r} failed: {err}") from err
    except Exception as err:
        raise RecipeError(f"{where}: importing {module_name!r} failed: "
                          f"{type(err).__name__}: {err}") from err
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RecipeError(f"{where}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if base is not None and not (isinstance(obj, type) and issubclass(obj, base)):
        raise RecipeError(f"{where}: {path!r} must be a subclass of "
                          f"{base.__module__}.{base.__qualname__}")
    return obj


@contextmanager
def user_code(where: str, path: str):
    """Run a user's component (a dataset, a schedule, a verifier factory): an exception it
    raises becomes one RecipeError line naming the recipe field, the import path, the
    exception and the user's own frame — not a traceback through braid's set-up."""
    try:
        yield
    except RecipeError:
        raise
    except Exception as err:
        if isinstance(err, DataMissing):
            raise MissingInput(f"{where}: {err}") from None
        if isinstance(err, DataError):  # a built-in dataset: its message names file and field
            raise RecipeError(f"{where}: {err}") from None
        raise RecipeError(f"{where}: {path} raised {type(err).__name__}: {err}"
                          f"{user_frame(err)}") from None
