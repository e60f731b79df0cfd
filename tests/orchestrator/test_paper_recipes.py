"""recipes/paper/: GRPO, SFT->RL, ReLIFT and LUFFY on Qwen2.5-Math-1.5B/7B with OpenR1-Math-46k,
and ReTool (SFT then RL with a Python interpreter) on Qwen2.5-7B-Instruct (docs/paper_recipes.md).
The models and data live on a cluster volume, so every recipe is validated here with its data
paths pointed at small samples in the published (or staged) column layout
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
RECIPES = sorted(PAPER.glob("math*.yaml"))
TOOL_RECIPES = ["retool7b_sft_rl.yaml"]
LORA_RECIPES = ["lora7b_grpo.yaml"]
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
    assert {p.name for p in PAPER.glob("*.yaml")} == expected | set(TOOL_RECIPES) | \
        set(LORA_RECIPES)
    for size in SIZES:
        for method in METHODS:
            text = (PAPER / f"math{size}_{method}.yaml").read_text()
            assert f"\nextends: math{size}_base.yaml\n" in text
            body = [line for line in text.splitlines() if line and not line.startswith("#")]
            assert len(body) <= 16, "a method recipe holds only what its method changes"


@pytest.mark.parametrize("path", RECIPES + [PAPER / n for n in LORA_RECIPES],
                         ids=lambda p: p.name)
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


@pytest.mark.parametrize("path", RECIPES + [PAPER / n for n in LORA_RECIPES],
                         ids=lambda p: p.name)
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


# --- ReTool: SFT on code-integrated traces, then GRPO with the python tool live ---------------
RETOOL = PAPER / "retool7b_sft_rl.yaml"
RETOOL_SFT = FIXTURES / "retool_sft_sample.jsonl"
RETOOL_EVAL = FIXTURES / "retool_aime_sample.jsonl"
RETOOL_SAMPLES = [f"data.train.args.path={RETOOL_SFT}", f"data.eval.args.path={RETOOL_EVAL}"]


def _retool_data():
    import importlib.util

    spec = importlib.util.spec_from_file_location("retool_data", PAPER / "retool_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_retool_passes_braid_validate_on_the_sample_data():
    exe = os.path.join(os.path.dirname(sys.executable), "braid")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "orchestrator.cli"]
    out = subprocess.run(cmd + ["validate", "--skip-model", str(RETOOL.relative_to(ROOT)),
                                *RETOOL_SAMPLES],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0 and ": ok (" in out.stdout, out.stdout + out.stderr
    assert "data.train: 3 records" in out.stdout and "data.eval: 4 records" in out.stdout


def test_retool_opens_with_purpose_hardware_staging_and_its_own_launch_line():
    text = RETOOL.read_text()
    assert text.startswith("# ReTool")
    for what in ("# Source:", "volcengine/verl@ea56e9ac47c3dfed65c028899012bb67f41f4c83",
                 "# Hardware:", "# Staging", "hf download", "JoeYing/ReTool-SFT",
                 "BytedTsinghua-SIA/DAPO-Math-17k", "recipes/paper/retool_data.py",
                 "# Launch: ray job submit --address"):
        assert what in text, what
    launch = re.search(r"# Launch: (.*?\n#.*?)\n", text + "\n", re.S).group(1)
    launch = " ".join(part.strip(" #\\") for part in launch.splitlines())
    assert launch.endswith(f"-- braid run recipes/paper/{RETOOL.name}"), launch
    assert all(len(line) <= 100 for line in text.splitlines())


def test_retool_settings_are_verls_retool_recipe():
    r = load_recipe(RETOOL, RETOOL_SAMPLES)
    assert r.model.path == "/mnt/braid/models/Qwen2.5-7B-Instruct"
    assert r.model.dtype == "bfloat16" and r.run_dir.startswith("/mnt/braid/runs/")
    # run_qwen2_7b_sft.sh: 6 epochs x 62 steps of 32, lr 1e-5 with 10% warm-up
    phases = r.schedule.args["phases"]
    assert [(p["policy"], p["steps"]) for p in phases] == [("sft", 372), ("rl", 300)]
    assert r.steps == 672 and r.data.prompts_per_step == 32
    a = r.algorithm
    assert (a.sft_lr, a.lr_warmup_steps, a.lr_schedule) == (1e-5, 37, "constant")
    # run_qwen2_7b_dapo.sh: GRPO, clip 0.2/0.28, clip_ratio_c 10, no KL, lr 1e-6, mini-batch 16
    assert (a.advantage, a.std_normalize, a.clip, a.clip_high, a.dual_clip) == \
        ("grpo", True, 0.2, 0.28, 10.0)
    assert (a.kl, a.entropy, a.lr, a.loss_agg) == (0.0, 0.0, 1e-6, "token_mean")
    assert r.data.prompts_per_step // a.ppo_mini_batches == 16 and a.ppo_epochs == 1
    assert a.max_tokens_per_micro_batch == 2048 + 16384
    assert (r.sampling.n, r.sampling.temperature, r.sampling.top_p) == (16, 1.0, 1.0)
    assert r.prompt.max_prompt_tokens == 2048 and r.prompt.chat_template is None
    assert r.prompt.tools == ["workers.agent.tools:python"]
    env = r.environment
    assert env.cls == "workers.agent.tools:ToolEnv" and env.tool_parser == "hermes"
    assert env.args["tools"] == r.prompt.tools and env.args["max_parallel_calls"] == 1
    assert env.args["verifier"] == "rewards.math:math_answer" and env.args["timeout_s"] == 30
    assert (env.max_turns, env.max_total_tokens) == (16, 16384)
    assert r.scoring.unscored == "drop" and r.roles.reward.args["verifiers"] == []
    rollout = r.roles.rollout
    assert rollout.cls == "workers.rollout.vllm_async:AsyncVLLMRollout"
    assert rollout.args["max_model_len"] == 2048 + 16384
    assert rollout.resources.num_gpus == rollout.args["tensor_parallel_size"]
    assert rollout.replicas * rollout.resources.num_gpus + \
        r.roles.learner.replicas * r.roles.learner.resources.num_gpus == 8
    ev = r.eval
    assert (ev.samples, ev.temperature, ev.top_p, ev.greedy) == (30, 1.0, 0.6, False)
    assert ev.bucket_key == "data_source"


def test_retool_data_cuts_traces_as_verl_and_writes_qwens_tool_call_text(tiny_chat_model):
    import doctest

    mod = _retool_data()
    assert doctest.testmod(mod).failed == 0
    # the text of a call is what Qwen2.5's template renders for a tool_calls entry
    qwen_calls = ("{%- for m in messages %}{%- for tool_call in m.tool_calls %}"
                  "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function"
                  " %}{%- endif %}{{- '<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}"
                  "{{- '\", \"arguments\": ' }}{{- tool_call.arguments | tojson }}"
                  "{{- '}\\n</tool_call>' }}{%- endfor %}{%- endfor %}")
    code = 'x = "é"\nprint(x * 2, {"a": 1})'
    msgs = [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "python", "arguments": {"code": code}}}]}]
    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    assert tok.apply_chat_template(msgs, chat_template=qwen_calls, tokenize=False) == \
        mod.tool_call_text(code)
    # the samples are its output, and each trace's answer is what the verifier credits
    train = list(FileDataset(**load_recipe(RETOOL, RETOOL_SAMPLES).data.train.args))
    for rec in train:
        demo = rec["demonstration"]
        assert [m["role"] for m in demo][-1] == "assistant" and "<tool_call>" in demo[0]["content"]
    assert math_answer([r["prompt"] for r in train], [r["demonstration"][-1]["content"]
                                                      for r in train],
                       answer=[r["answer"] for r in train]) == [1.0] * len(train)
    ev = list(FileDataset(**load_recipe(RETOOL, RETOOL_SAMPLES).data.eval.args))
    assert {r["data_source"] for r in ev} == {"aime_2024", "aime_2025"}
    assert all(r["prompt"].endswith(mod.ANSWER_FORMAT) for r in ev)


def test_lora_recipe_is_the_grpo_baseline_with_adapters():
    """LoRA on one node: math7b_grpo's every setting but the adapters and their learning rate;
    the adapters' default ZeRO stage (0); the engines hold one adapter (lockstep)."""
    lora = load_recipe(PAPER / "lora7b_grpo.yaml", SAMPLES)
    grpo = recipe("7b", "grpo")
    assert lora.model.lora.rank == 32 and lora.model.lora.sync == "adapter"
    assert lora.model.lora.target_modules == "all-linear"
    assert lora.algorithm.lr == pytest.approx(10 * grpo.algorithm.lr)
    assert lora.algorithm.model_copy(update={"lr": grpo.algorithm.lr}) == grpo.algorithm
    assert lora.sampling == grpo.sampling and lora.schedule == grpo.schedule
    assert "zero_stage" not in lora.roles.learner.args
    assert lora.roles.learner.replicas == grpo.roles.learner.replicas
