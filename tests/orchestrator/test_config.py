import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.errors import RecipeError
from orchestrator.config import load_recipe
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


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_shipped_recipe_validates(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name their data relative to the repository
    recipe = load_recipe(path)
    # as `braid validate --skip-model --skip-data` does: models and data that live on a
    # cluster volume, come from another recipe or from `make smollm2` are warnings here
    # (tests/orchestrator/test_paper_recipes.py checks the paper recipes on sample files)
    resolved = resolve_recipe(recipe, skip_model=True, skip_data=True)
    assert {"rollout", "learner", "reward"} <= set(resolved.roles)
    assert path.read_text().startswith("#"), "a recipe opens with its purpose and launch line"


def test_overrides_and_interpolation(recipe_file):
    p = recipe_file(lambda d: d.update(run_dir="runs/${name}-x"))
    r = load_recipe(p, ["name=abc", "roles.learner.replicas=3", "sampling.temperature=0.7"])
    assert (r.name, r.run_dir, r.roles.learner.replicas, r.sampling.temperature) == \
        ("abc", "runs/abc-x", 3, 0.7)


def test_an_override_naming_a_policy_or_class_replaces_the_mapping(monkeypatch):
    """As under ``extends``: the recipe's relift args do not leak into the new policy, nor a
    role's args into another class; a mapping without either merges."""
    monkeypatch.chdir(ROOT)
    path = ROOT / "recipes" / "smollm2_word_problems.yaml"
    assert load_recipe(path).schedule.args == {"buffer_size": 8}
    r = load_recipe(path, ["schedule={policy: rl}", 'roles.reward={cls: "x:Y"}',
                           "sampling={temperature: 1.0}"])
    assert (r.schedule.policy, r.schedule.args) == ("rl", {})
    assert (r.roles.reward.cls, r.roles.reward.args) == ("x:Y", {})
    assert (r.sampling.temperature, r.sampling.max_tokens) == (1.0, 96)  # merged


def test_list_index_override():
    r = load_recipe(ROOT / "recipes/arith_grpo_cpu.yaml", ["schedule.args.phases.0.steps=7"])
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
    (lambda d: d.update(rollout={"max_staleness": -1}),
     "rollout.max_staleness: Input should be greater than or equal to 0"),
    (lambda d: d.update(rollout={"max_staleness": 2},
                        schedule={"policy": "tests.fixtures.tasks:OnPolicyOnly"}),
     "rollout.max_staleness: 2, but schedule 'tests.fixtures.tasks:OnPolicyOnly' decides on "
     "rollouts at most 0 weight version(s) old"),
    (lambda d: d["algorithm"].update(tis_cap=2.0, ppo_epochs=2),
     "tis_cap with ppo_mini_batches x ppo_epochs > 1 needs the learner's log-probs"),
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


# --- validate looks at the data and the model ------------------------------------------------

USER_DATA = '''
import json


class Problems:
    def __init__(self, path):
        with open(path) as f:
            self.rows = [json.loads(line) for line in f]

    def __iter__(self):
        return iter(self.rows)
'''


def _validate(args, cwd):
    braid = [sys.executable, "-m", "orchestrator.cli", "validate"]
    import os
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(braid + args, capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=120)


def test_an_empty_model_folder_fails_validate_unless_skipped(recipe_file, tmp_path):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    p = recipe_file(lambda d: d["model"].update(path=str(empty)))
    with pytest.raises(RecipeError, match=r"model.path: '.*empty-model' is not a Hugging Face "
                                          r"model folder \(no config.json\)"):
        resolve_recipe(load_recipe(p))
    skipped = _validate(["--skip-model", str(p)], tmp_path)
    assert skipped.returncode == 0, skipped.stderr
    assert "warning: model.path: " in skipped.stdout and "not checked (--skip-model)" in \
        skipped.stdout
    assert "prompts not tokenised: no model folder here (--skip-model)" in skipped.stdout


def test_a_user_dataset_that_raises_is_one_line_with_the_users_frame(recipe_file, tmp_path):
    (tmp_path / "my_data.py").write_text(USER_DATA)
    p = recipe_file(lambda d: d["data"].update(
        train={"cls": "my_data:Problems", "args": {"path": "missing.jsonl"}}))
    out = _validate([str(p)], tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == (
        "braid: recipe error: data.train: my_data:Problems raised FileNotFoundError: [Errno 2] "
        "No such file or directory: 'missing.jsonl' (at my_data.py:7 in __init__)")


def test_records_without_a_prompt_fail_validate(recipe_file, tmp_path):
    (tmp_path / "my_data.py").write_text(USER_DATA)
    (tmp_path / "rows.jsonl").write_text('{"id": "a", "question": "1+1?", "answer": "2"}\n')
    p = recipe_file(lambda d: d["data"].update(
        train={"cls": "my_data:Problems", "args": {"path": "rows.jsonl"}}))
    out = _validate([str(p)], tmp_path)
    assert out.returncode == 2
    assert "data.train: record 0 of my_data:Problems has no 'prompt' (fields: id, question, " \
           "answer)" in out.stderr
    p = recipe_file(lambda d: d["data"].update(
        train={"cls": "orchestrator.data:FileDataset", "args": {"path": "rows.jsonl"}}))
    out = _validate([str(p)], tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip() == ("braid: recipe error: data.train: rows.jsonl: no column "
                                  "'prompt' for fields.prompt (columns: answer, id, question)")


def test_validate_warns_about_short_phases_and_small_datasets(make_recipe, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(f'{{"prompt": "{i}+1=", "answer": "{i + 1}"}}\n' for i in range(5)))
    recipe = make_recipe(**{
        "steps": 10, "data.train": {"cls": "orchestrator.data:FileDataset",
                                    "args": {"path": str(rows)}},
        "schedule": {"policy": "phases", "args": {"phases": [{"policy": "sft", "steps": 3},
                                                             {"policy": "rl", "steps": 4}]}}})
    warnings = resolve_recipe(recipe).warnings
    assert "data.prompts_per_step = 8 is larger than data.train (5 records): a step repeats " \
           "prompts" in warnings
    assert "schedule.args.phases cover 7 steps of 10: the last phase runs on for the " \
           "remaining 3" in warnings


def test_validate_formats_the_first_prompts_with_the_models_tokenizer(make_chat_recipe):
    recipe = make_chat_recipe(**{"prompt.system": "Answer with a number."})
    notes = resolve_recipe(recipe).notes
    assert "prompt: chat template, stop tokens [5, 2], at most 248 prompt tokens" in notes
    assert any(n.startswith("data.train: first 8 prompts are ") for n in notes), notes
    bad = make_chat_recipe(**{"prompt.template": "{question}"})
    with pytest.raises(RecipeError, match=r"prompt: data.train: prompt.template names "
                                          r"\{question\}, which record"):
        resolve_recipe(bad)


def test_a_missing_chat_template_file_is_named_even_without_the_model(make_recipe):
    recipe = make_recipe(**{"prompt.chat_template": "nowhere/template.jinja"})
    with pytest.raises(RecipeError, match="prompt.chat_template: no such file: "
                                          "'nowhere/template.jinja'"):
        resolve_recipe(recipe, skip_model=True)


def test_one_shot_datasets_budgets_and_bucket_keys_are_checked(recipe_file, make_recipe,
                                                               tmp_path):
    (tmp_path / "gen_data.py").write_text(
        "def problems():\n"
        "    return ({'id': str(i), 'prompt': f'{i}+1=', 'answer': str(i + 1)} "
        "for i in range(9))\n")
    p = recipe_file(lambda d: d["data"].update(train={"cls": "gen_data:problems"}))
    out = _validate([str(p)], tmp_path)
    assert out.returncode == 2 and "data.train: gen_data:problems gives a one-shot iterator" \
        in out.stderr
    with pytest.raises(RecipeError, match="prompt.max_prompt_tokens = 64 does not fit the "
                                          "engine's max_model_len = 64"):
        resolve_recipe(make_recipe(**{"prompt.max_prompt_tokens": 64}))
    warnings = resolve_recipe(make_recipe(**{"eval.bucket_key": "level"})).warnings
    assert any("eval.bucket_key: none of the first eval records has a field 'level'" in w
               for w in warnings)


def test_models_and_data_not_on_this_machine_fail_validate_unless_skipped(make_recipe):
    from core.errors import MissingInput

    recipe = make_recipe(**{"model.path": "/nowhere/model", "data.eval": {
        "cls": "orchestrator.data:FileDataset", "args": {"path": "/nowhere/test.jsonl"}}})
    with pytest.raises(MissingInput, match="data.eval: /nowhere/test.jsonl: no such file"):
        resolve_recipe(recipe)
    with pytest.raises(MissingInput, match=r"model.path: no model folder at '/nowhere/model' "
                                           r"\(`braid validate --skip-model` checks"):
        resolve_recipe(recipe, skip_data=True)
    warnings = resolve_recipe(recipe, skip_model=True, skip_data=True).warnings
    assert "model.path: no model folder at '/nowhere/model' — not checked (--skip-model); " \
           "`braid run` needs it" in warnings
    assert any(w.startswith("data.eval: /nowhere/test.jsonl: no such file or folder") and
               w.endswith("not checked (--skip-data); `braid run` needs it") for w in warnings)


def test_a_mistyped_data_path_fails_braid_validate_in_one_line(recipe_file, tmp_path):
    p = recipe_file(lambda d: d["data"].update(
        train={"cls": "orchestrator.data:FileDataset", "args": {"path": "problms.jsonl"}}))
    out = _validate([str(p)], tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "braid: recipe error: data.train: problms.jsonl: no such file or folder"), lines
    assert "--skip-data" in lines[0] and ": ok (" not in out.stdout
    skipped = _validate(["--skip-data", str(p)], tmp_path)
    assert skipped.returncode == 0 and ": ok (" in skipped.stdout, skipped.stderr
    assert "warning: data.train: problms.jsonl: no such file or folder" in skipped.stdout
    assert "not checked (--skip-data)" in skipped.stdout


def test_training_sampling_that_hides_behaviour_log_probs_is_refused(tmp_path):
    from core.errors import validate_model
    from orchestrator.config import Recipe

    base = recipe_dict(tmp_path / "m", tmp_path / "run")
    with pytest.raises(RecipeError, match="top_p"):
        validate_model(Recipe, base | {"sampling": {"top_p": 0.9}}, "")
    ppo = base | {"algorithm": {"ppo_mini_batches": 2}}
    validate_model(Recipe, ppo, "")
    with pytest.raises(RecipeError, match="min_tokens"):
        validate_model(Recipe, ppo | {"sampling": {"min_tokens": 4}}, "")
    # rollouts ahead of the learner need the log-probs of the weights that sampled them
    validate_model(Recipe, base | {"rollout": {"max_staleness": 1}}, "")
    for sampling in ({"temperature": 0.0}, {"min_tokens": 2}):
        with pytest.raises(RecipeError, match="max_staleness > 0 and algorithm.tis_cap"):
            validate_model(Recipe, base | {"rollout": {"max_staleness": 1},
                                           "sampling": sampling}, "")
