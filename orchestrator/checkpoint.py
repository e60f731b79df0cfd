"""Resumable checkpoints: everything a run needs to continue as if it had never stopped.

    <run_dir>/checkpoints/step_000040/
        learner/...                 DeepSpeed checkpoint (model, main optimizer, ZeRO
                                    partitions per rank) + the other named optimizer states
        critic/...                  the same for the value model (PPO with a critic)
        controller.json             step, weight version, data cursor, schedule state,
                                    demonstration store, eval/reward history, mlflow run id,
                                    the controller's RNG states, the base model's path
        inflight.pkl                steps whose rollouts were generated ahead of the learner
                                    (rollout.max_staleness > 0): prompts, rollouts, scores;
                                    the pipeline's counters
    <run_dir>/checkpoints/latest    name of the newest complete checkpoint

A checkpoint is written to ``step_N.tmp`` and renamed when complete; ``latest`` is replaced
atomically after it; only the newest ``checkpoint.keep_last`` are kept. Learner ranks write
to the same path, so on a multi-node cluster ``run_dir`` must be on shared storage.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from core.errors import RecipeError
from orchestrator.groups import WorkerError


def save(c, step: int) -> Path:
    """Write the checkpoint of ``step``. A checkpoint that cannot be written (a full disk, a
    learner that fails to save) is removed — freeing what it took — and the run stops with one
    line naming the step, the path and the cause; ``latest`` still names the previous one."""
    root = c.run_dir.resolve() / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / (final.name + ".tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for group in (c.learner, c.critic):
            if group is not None:
                group.call(group.fanout("save_state", str(tmp)), "save_state")
        c.rollouts.save(tmp)  # steps in flight (rollout.max_staleness > 0)
        state = {"step": step, "weight_version": c.version, "cursor": c.cursor.state(),
                 "schedule": c.schedule.state_dict(), "demos": c.demos.state_dict(),
                 "history": c.history, "mlflow_run_id": c.logger.run_id, "rng": rng_state(),
                 "model_path": str(Path(c.recipe.model.path).resolve()),
                 "lora": c.recipe.model.lora and c.recipe.model.lora.model_dump()}
        (tmp / "controller.json").write_text(json.dumps(state))
        publish(root, tmp, final)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)  # frees what it took; `latest` is untouched
        if not isinstance(err, (OSError, WorkerError)) or getattr(err, "died", False):
            raise  # a learner rank lost while saving: recovery names the checkpoint
        raise WorkerError(f"the checkpoint of step {step} could not be written to {tmp}: "
                          f"{_why(root, err)}; the previous checkpoint is kept "
                          f"({_latest(root)}, the one --resume uses)", "checkpoint") from err
    c.saved_step = step
    kept = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
                  and not p.name.endswith(".tmp"))
    for old in kept[:-c.recipe.checkpoint.keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def publish(root: Path, tmp: Path, final: Path) -> None:
    """The complete checkpoint ``tmp`` becomes ``final`` and ``latest`` names it."""
    if final.exists():  # the same step again: never leave `latest` naming a missing folder
        old = root / (final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    pointer = root / "latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")


def _why(root: Path, err: BaseException) -> str:
    """'no space left on device (... free on ...)' when the disk is the cause — an OSError
    ENOSPC here, or a learner's save failing on a disk left with (almost) nothing free:
    torch's writer then reports only 'unexpected pos' — else the error itself."""
    import errno

    where = next((p for p in (root, *root.parents) if p.exists()), Path("/"))
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = None
    enospc = (isinstance(err, OSError) and err.errno == errno.ENOSPC) or \
        "No space left" in str(err)
    if enospc or (free is not None and free < 2**20):
        shown = f"{free / 2**20:.1f} MiB free on {where}" if free is not None else str(where)
        return f"no space left on device ({shown})"
    return str(err)


def _latest(root: Path) -> str:
    pointer = root / "latest"
    return str(root / pointer.read_text().strip()) if pointer.is_file() else "none was written"


def find(run_dir: Path, where: str | None) -> Path:
    """A checkpoint folder from --resume's argument: a checkpoint, a run directory, or None
    (this recipe's run directory)."""
    path = Path(where) if where else run_dir
    if (path / "controller.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        if (root / "latest").is_file():
            found = root / (root / "latest").read_text().strip()
            if not (found / "controller.json").is_file():
                raise RecipeError(f"--resume: {root / 'latest'} names {found.name}, which is "
                                  "not a complete checkpoint; pass a checkpoint folder instead")
            return found
    raise RecipeError(f"--resume: no checkpoint in {str(path)!r} (looked for controller.json "
                      "and checkpoints/latest)")


def read_state(path: Path) -> dict:
    return json.loads((path / "controller.json").read_text())


def load(c, path: Path, state: dict) -> int:
    """Restore learner, data, schedule and demonstrations, then push the learner's weights to
    the engines under the saved version. Returns the step to continue after."""
    lora = c.recipe.model.lora and c.recipe.model.lora.model_dump()
    if state.get("lora") != lora:  # the learner's parameters would not match the checkpoint's
        raise RecipeError(f"{path}: the checkpoint was trained with model.lora = "
                          f"{state.get('lora')}, the recipe asks for {lora}; resume with the "
                          "recipe it was trained with")
    for group in (c.learner, c.critic):
        if group is not None:
            group.call(group.fanout("load_state", str(path.resolve())), "load_state")
    c.cursor.load_state(state["cursor"])
    c.schedule.load_state_dict(state["schedule"])
    c.demos.load_state_dict(state["demos"])
    c.rollouts.load(path)
    c.history = state["history"]
    if "rng" in state:  # checkpoints from before RNG states were saved have none
        set_rng_state(state["rng"])
    c.version, c.stale = int(state["weight_version"]), False
    c.sync_weights(resend=True)
    return int(state["step"])


def rng_state() -> dict:
    """Python's and numpy's global RNG states (a user schedule may draw from them; braid's
    own sampling seeds derive from the step, and learner ranks save torch's RNG themselves)."""
    import random

    import numpy as np

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
