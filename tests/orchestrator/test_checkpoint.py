"""Checkpoint bookkeeping that needs no learner: finding what --resume should load, and the
controller's RNG states."""

import json
import random

import numpy as np
import pytest

from core.errors import RecipeError
from orchestrator import checkpoint


def _ckpt(root, name):
    (root / name).mkdir(parents=True)
    (root / name / "controller.json").write_text(json.dumps({"step": 1}))
    return root / name


def test_find_follows_latest_and_refuses_a_missing_target(tmp_path):
    root = tmp_path / "checkpoints"
    good = _ckpt(root, "step_000002")
    (root / "latest").write_text("step_000002\n")
    assert checkpoint.find(tmp_path, None) == good
    assert checkpoint.find(tmp_path, str(good)) == good  # a checkpoint folder itself
    (root / "latest").write_text("step_000004")  # the folder is gone (interrupted replace)
    with pytest.raises(RecipeError, match="names step_000004, which is not a complete"):
        checkpoint.find(tmp_path, None)
    with pytest.raises(RecipeError, match="no checkpoint in"):
        checkpoint.find(tmp_path / "elsewhere", None)


def test_rng_states_round_trip_through_json():
    random.seed(3)
    np.random.seed(3)
    state = json.loads(json.dumps(checkpoint.rng_state()))
    expected = (random.random(), np.random.rand())
    random.seed(99)
    np.random.seed(99)
    checkpoint.set_rng_state(state)
    assert (random.random(), np.random.rand()) == expected
