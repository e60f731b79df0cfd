"""The errors every layer raises and the helpers that word them.

braid's packages are layered: ``core`` (errors, registry, the weight-sync transport) below
``rewards``, below ``workers``, below ``orchestrator``; a package imports only from its own
layer and the ones below (tests/test_layers.py checks it).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError


class RecipeError(Exception):
    """A user error in a recipe: bad YAML, a wrong field, an import path that does not resolve."""


class MissingInput(RecipeError):
    """A model folder or data file the recipe names is not on this machine. ``braid run``
    stops on it; ``braid validate`` warns (the file may live on the cluster's volume, or come
    from another recipe) and checks the rest."""


class VerifierCallError(RecipeError):
    """A verifier refused the call itself, not a sample: a remote server answered 4xx (a wrong
    name, token or record fields). The reward worker stops the run on it, naming it, instead of
    scoring every sample None."""


class InputsLost(RuntimeError):
    """A worker could not fetch its inputs: Ray lost them (their node or owner gone). Raised
    on every rank of a group together, before any collective, so that the call can be made
    again once the inputs are (orchestrator/groups.py reads it as lost inputs)."""


class DataError(ValueError):
    """A data file that cannot serve as a dataset; the message names the file and the field."""


class DataMissing(DataError):
    """The data file or folder is not there."""


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in (prefix.split(".") if prefix else []) + list(e["loc"]))
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "missing":
            msg = "required field is missing"
        else:
            msg = e["msg"]
            if "input" in e and not isinstance(e["input"], dict | list):
                msg += f" (got {e['input']!r})"
        lines.append(f"{path or '<recipe>'}: {msg}")
    return "; ".join(lines)


def validate_model(model: type[BaseModel], data: Any, where: str) -> BaseModel:
    """Validate `data` into `model`, raising RecipeError with field paths under `where`."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, where)) from None



_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')
_BRAID = Path(__file__).resolve().parents[1]
_OURS = tuple(str(_BRAID / pkg) + os.sep for pkg in ("core", "orchestrator", "workers", "rewards"))


def _is_user_file(path: str) -> bool:
    generated = ("site-packages", "dist-packages", "huggingface/modules", "torchinductor")
    if path.startswith("<") or any(g in path for g in generated):
        return False
    resolved = str(Path(path).resolve())
    stdlib = str(Path(os.__file__).resolve().parent) + os.sep
    return not resolved.startswith(_OURS) and not resolved.startswith(stdlib)


def user_frame(err: BaseException) -> str:
    """`` (at my_module.py:12 in load)``: the innermost frame of an exception that is the
    user's own code (not braid, not an installed package, not the standard library), or "".

    Reads a live traceback, the text of a traceback re-raised from a process pool
    (``multiprocessing``'s RemoteTraceback), or one embedded in the message (Ray's task errors).
    """
    import traceback

    remote = getattr(err.__cause__, "tb", None)
    frames = _FRAME.findall(remote if isinstance(remote, str) else str(err))
    if not frames and err.__traceback__ is not None:
        frames = [(f.filename, f.lineno, f.name) for f in traceback.extract_tb(err.__traceback__)]
    mine = [f for f in frames if _is_user_file(f[0])]
    if not mine:
        return ""
    path, line, fn = mine[-1]
    try:
        shown = os.path.relpath(path)
    except ValueError:
        shown = path
    shown = shown if not shown.startswith("..") else path
    return f" (at {shown}:{line} in {fn})"
