"""recipes/paper/: GRPO, SFT->RL, ReLIFT and LUFFY on Qwen2.5-Math-1.5B/7B with OpenR1-Math-46k
(docs/paper_recipes.md). The models and data live on a cluster volume, so every recipe is
validated here with its data paths pointed at small samples in the published column layout
(tests/fixtures/paper/), and the settings the recipes take from the papers' code are pinned."""

import os
import re
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from orchestrator.config import load_recipe
from orchestrator.data import FileDataset
from orchestrator.prompts import PromptFormatter
from rewards.math import math_answer
from tests.conftest import ROOT

PAPER = ROOT / "recipes" / "paper"
RECIPES = sorted(PAPER.glob("*.yaml"))
FIXTURES = ROOT / "tests" / "fixtures" / "paper"
TRAIN = FIXTURES / "openr1_math_sample.jsonl"
EVAL = FIXTURES / "valid_all_sample.jsonl"
SAMPLES = [f"data.train.args.path={TRAIN}", f"data.eval.args.path={EVAL}"]
SIZES = {"7b": "Qwen2.5-Math-7B", "1p5b": "Qwen2.5-Math-1.5B"}
METHODS = ("grpo", "sft_rl", "relift", "luffy")


def recipe(size: str, method: str):
    return load_recipe(PAPER / f"math{size}_{method}.yaml", SAMPLES)


def test_one_base_per_model_size_and_one_short_recipe_per_method():
    names = {p.name for p in RECIPES}
    expected = {f"math{s}_{m}.yaml" for s in SIZES for m in ("base", *METHODS)}
    assert names == expected
    for size in SIZES:
        for method in METHODS:
            text = (PAPER / f"math{size}_{method}.yaml").read_text()
            assert f"\nextends: math{size}_base.yaml\n" in text
            body = [line for line in text.splitlines() if line and not line.startswith("#")]
            assert len(body) <= 16, "a method recipe holds only what its method changes"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_passes_braid_validate_on_the_sample_data(path):
    exe = os.path.join(os.path.dirname(sys.executable), "braid")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "orchestrator.cli"]
    out = subprocess.run(cmd + ["validate", "--skip-model", str(path.relative_to(ROOT)),
                                *SAMPLES],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0 and ": ok (" in out.stdout, out.stdout + out.stderr
    assert "(--skip-model)" in out.stdout
    assert "data.train: 5 records" in out.stdout and "data.eval: 7 records" in out.stdout


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_opens_with_purpose_hardware_staging_and_its_own_launch_line(path):
    text = path.read_text()
    assert text.startswith("#")
    for what in ("# Hardware:", "# Staging", "hf download", "Elliott/Openr1-Math-46k-8192",
                 "valid.all.parquet", "# Launch: ray job submit --address"):
        assert what in text, what
    launch = re.search(r"# Launch: (.*?\n#.*?)\n", text + "\n", re.S).group(1)
    launch = " ".join(part.strip(" #\\") for part in launch.splitlines())
    assert "--working-dir ." in launch
    assert launch.endswith(f"-- braid run recipes/paper/{path.name}"), launch
    assert all(len(line) <= 100 for line in text.splitlines())


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("method", ("base", *METHODS))
def test_settings_shared_by_the_repos(size, method):
    r = recipe(size, method)
    assert SIZES[size] in r.model.path and r.model.path.startswith("/mnt/braid/models/")
    assert r.run_dir.startswith("/mnt/braid/runs/") and r.model.dtype == "bfloat16"
    assert r.data.train.cls == r.data.eval.cls == "orchestrator.data:FileDataset"
    assert r.data.train.args["fields"] == {"prompt": "prompt",
                                           "answer": "reward_model.ground_truth",
                                           "demonstration": "target.0.content"}
    assert r.data.eval.args["fields"] == {"prompt": "prompt",
                                          "answer": "reward_model.ground_truth"}
    # 128 prompts per rollout batch, 2 PPO mini-batches of 64: one optimizer step per 64 here
    assert r.data.prompts_per_step == 64
    assert r.prompt.style == "chat" and r.prompt.response_prefix == "<think>\n"
    assert (ROOT / r.prompt.chat_template).is_file()
    assert r.prompt.max_prompt_tokens == 1024
    assert r.sampling.temperature == 1.0 and r.sampling.top_p == 1.0
    assert r.sampling.max_tokens == 8192
    assert r.sampling.n == (7 if method == "luffy" else 8)
    a = r.algorithm
    assert (a.std_normalize, a.kl, a.entropy, a.lr, a.weight_decay) == (False, 0.0, 1e-3, 1e-6,
                                                                        0.01)
    # loss_remove_clip=True in ReLIFT's and LUFFY's scripts; loss_remove_token_mean=True in all
    assert a.clip == (None if method in ("relift", "luffy") else 0.2)
    assert a.tis_cap == (2.0 if method in ("relift", "luffy") else None)
    assert a.loss_agg == "seq_mean_token_sum_norm" and a.loss_norm_tokens == 8192
    assert r.roles.reference is None and r.roles.teacher is None
    rollout = r.roles.rollout
    assert rollout.args["max_model_len"] >= r.prompt.max_prompt_tokens + r.sampling.max_tokens
    assert rollout.resources.num_gpus == rollout.args["tensor_parallel_size"]
    gpus = rollout.replicas * rollout.resources.num_gpus + \
        r.roles.learner.replicas * r.roles.learner.resources.num_gpus
    assert gpus == 8, "the papers' single node of 8 GPUs"
    assert r.roles.reward.args["verifiers"] == ["rewards.math:math_answer"]
    ev = r.eval
    assert (ev.temperature, ev.top_p, ev.max_tokens) == (0.6, 1.0, 8192)
    assert ev.bucket_key == "data_source" and ev.samples >= 1 and not ev.greedy


@pytest.mark.parametrize("size", SIZES)
def test_grpo_is_relifts_rl_baseline(size):
    r = recipe(size, "grpo")
    assert r.schedule.policy == "rl" and r.algorithm.grad_clip == 1.0
    assert r.steps == 2142  # 3 epochs of ~45.7k prompts, 64 per step


@pytest.mark.parametrize("size", SIZES)
def test_sft_rl_is_luffys_sft_plus_rl(size):
    r = recipe(size, "sft_rl")
    phases = r.schedule.args["phases"]
    assert r.schedule.policy == "phases"
    assert [(p["policy"], p["steps"]) for p in phases] == [("sft", 2142), ("rl", 1000)]
    assert r.steps == sum(p["steps"] for p in phases)
    assert r.algorithm.sft_lr == 5e-5 and r.algorithm.lr == 1e-6


@pytest.mark.parametrize("size", SIZES)
def test_relift_buffer_separate_sft_optimizer_and_clip(size):
    r = recipe(size, "relift")
    assert r.schedule.policy == "relift"
    assert r.schedule.args == {"buffer_size": 128, "entropy": 0.001, "optimizer": "sft"}
    assert r.algorithm.grad_clip == 0.7 and r.algorithm.sft_lr == 1e-6
    assert r.steps == 2142


@pytest.mark.parametrize("size", SIZES)
def test_luffy_puts_the_trace_in_a_group_of_eight_with_gamma_0_1(size):
    r = recipe(size, "luffy")
    assert r.schedule.policy == "luffy" and r.schedule.args == {"gamma": 0.1}
    assert r.sampling.n + 1 == 8 and not r.algorithm.std_normalize
    assert r.steps == 1000


def test_the_samples_read_as_the_recipes_map_them():
    r = recipe("7b", "base")
    train = FileDataset(**r.data.train.args)
    ev = FileDataset(**r.data.eval.args)
    for rec in [*train, *ev]:
        assert [m["role"] for m in rec["prompt"]] == ["system", "user"]
        assert "<think>" in rec["prompt"][0]["content"] and rec["answer"]
    assert all(rec["demonstration"].startswith("<think>\n") and
               "</think>" in rec["demonstration"] for rec in train)
    assert {rec["data_source"] for rec in ev} == {"aime", "aime25", "amc", "math", "minerva",
                                                  "olympiad_bench"}
    # the verifier accepts every published-style trace against its ground truth
    recs = list(train)
    assert math_answer([x["prompt"] for x in recs], [x["demonstration"] for x in recs],
                       answer=[x["answer"] for x in recs]) == [1.0] * len(recs)


def test_prompt_is_qwen_chatml_with_the_think_opener(tiny_chat_model):
    """The pinned template plus response_prefix gives what the repos' "-think" tokenizers
    give: the record's system and user turns, then the assistant header and "<think>\\n"; the
    R1 trace, which starts with "<think>\\n" too, loses it as an SFT target."""
    r = recipe("1p5b", "relift")
    cfg = r.prompt.model_copy(update={"chat_template": str(ROOT / r.prompt.chat_template)})
    fmt = PromptFormatter(AutoTokenizer.from_pretrained(tiny_chat_model), cfg)
    rec = next(iter(FileDataset(**r.data.train.args)))
    system, user = (m["content"] for m in rec["prompt"])
    assert fmt.text(rec) == (f"<|im_start|>system\n{system}<|im_end|>\n"
                             f"<|im_start|>user\n{user}<|im_end|>\n"
                             "<|im_start|>assistant\n<think>\n")
    demo = rec["demonstration"]
    assert fmt.completion_ids(demo) == fmt.completion_ids(demo[len("<think>\n"):])
    assert fmt.completion_ids(demo)[-1] == fmt.end_of_turn
