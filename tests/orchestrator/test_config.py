import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.config import RecipeError, load_recipe
from orchestrator.setup import resolve_recipe
from tests.conftest import ROOT, recipe_dict

RECIPES = sorted((ROOT / "recipes").glob("**/*.yaml"))


@pytest.fixture
def recipe_file(tiny_model, tmp_path):
    def write(mutate=None) -> Path:
        d = recipe_dict(tiny_model, tmp_path / "run")
        if mutate:
            mutate(d)
        p = tmp_path / "recipe.yaml"
        p.write_text(yaml.safe_dump(d))
        return p

    return write


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    # models come from a cluster volume, another recipe or `make smollm2`: not looked at here
    resolved = resolve_recipe(recipe, check_model=False)
    assert {"rollout", "learner", "reward"} <= set(resolved.roles)
    assert path.read_text().startswith("#"), "a recipe opens with its purpose and launch line"


def test_overrides_and_interpolation(recipe_file):
    p = recipe_file(lambda d: d.update(run_dir="runs/${name}-x"))
    r = load_recipe(p, ["name=abc", "roles.learner.replicas=3", "sampling.temperature=0.7"])
    assert (r.name, r.run_dir, r.roles.learner.replicas, r.sampling.temperature) == \
        ("abc", "runs/abc-x", 3, 0.7)


def test_list_index_override():
    r = load_recipe(RECIPES[0], ["schedule.args.phases.0.steps=7"])
    assert r.schedule.args["phases"][0]["steps"] == 7


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["roles"]["learner"].update(replcas=2), "roles.learner.replcas: unknown field"),
    (lambda d: d.update(steps="many"), "steps: Input should be a valid integer"),
    (lambda d: d.pop("steps"), "steps: required field is missing"),
    (lambda d: d["roles"]["rollout"].update(cls="workers.nope:Rollout"),
     "roles.rollout.cls: no module named 'workers.nope'"),
    (lambda d: d["roles"]["rollout"].update(cls="workers.reward:Nope"),
     "roles.rollout.cls: module 'workers.reward' has no attribute 'Nope'"),
    (lambda d: d["roles"]["rollout"].update(cls="workers.reward:RuleRewardWorker"),
     "roles.rollout.cls: 'workers.reward:RuleRewardWorker' must be a subclass of "
     "workers.base.RolloutWorker"),
    (lambda d: d["roles"]["learner"]["args"].update(zero_stage=5),
     "roles.learner.args.zero_stage: Input should be less than or equal to 3"),
    (lambda d: d["roles"]["reward"]["args"].update(verifiers=["rewards.arithmetic:nope"]),
     "roles.reward.args.verifiers.0: module 'rewards.arithmetic' has no attribute 'nope'"),
    (lambda d: d["data"]["train"]["args"].update(digits=[3, 1]), "data.train.args: Value error"),
    (lambda d: d.update(schedule={"policy": "relax"}), "schedule.policy: expected an import"),
    (lambda d: d["algorithm"].update(kl=0.1), "algorithm.kl > 0 needs roles.reference"),
])
def test_bad_recipes_name_the_field(recipe_file, mutate, expected):
    p = recipe_file(mutate)
    with pytest.raises(RecipeError) as err:
        resolve_recipe(load_recipe(p))
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_validate_exit_codes_and_no_traceback(recipe_file):
    braid = [sys.executable, "-m", "orchestrator.cli", "validate"]
    ok = subprocess.run(braid + [str(recipe_file())], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert ": ok (" in ok.stdout
    bad = subprocess.run(braid + [str(recipe_file(lambda d: d["sampling"].update(nn=3)))],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "braid: recipe error: sampling.nn: unknown field"
    missing = subprocess.run(braid + ["/nonexistent.yaml"], capture_output=True, text=True,
                             cwd=ROOT)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


def test_malformed_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nroles: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(p)


def test_reference_role_is_not_started_without_a_kl_term(make_recipe):
    ref = {"cls": "workers.reference:HFReference"}
    off = resolve_recipe(make_recipe(**{"roles.reference": ref, "algorithm.kl": 0.0}))
    assert "reference" not in off.roles
    assert any("roles.reference is not started" in w for w in off.warnings)
    on = resolve_recipe(make_recipe(**{"roles.reference": ref, "algorithm.kl": 0.01}))
    assert "reference" in on.roles and not on.warnings
