"""Exact resume: N steps straight, and N/2 steps + stop + resume + N/2 steps, give the same
weights, the same metrics and the same ReLIFT buffer (CPU runs are deterministic: sampling
seeds derive from the step, the data cursor and every optimizer state are restored) — in
lockstep, and with rollouts generated a step ahead (rollout.max_staleness: 1), where the
checkpoint holds the step in flight.

The run is what a user brings: a JSONL file of natural-language problems read by FileDataset,
prompts through the tokenizer's chat template; the checkpoint falls in the middle of the
data's second pass."""

import json

import pytest
import torch

from orchestrator.controller import Controller

pytestmark = pytest.mark.slow


def _recipe(make_chat_recipe, run_dir, steps, data, k=0, every=2, lora=False):
    extra = {"model.lora": {"rank": 8, "alpha": 16}, "algorithm.lr": 1e-2,
             "roles.learner.args": {"threads": 1}} if lora else {}
    return make_chat_recipe(**extra, **{
        "rollout.max_staleness": k, "checkpoint.every": every,
        "steps": steps, "run_dir": str(run_dir), "data.prompts_per_step": 4,
        "data.train": {"cls": "orchestrator.data:FileDataset",
                       "args": {"path": str(data), "fields": {"prompt": "question",
                                                              "demonstration": "solution"}}},
        "data.eval": None, "prompt.system": "Answer with the number.",
        "roles.reward.args.verifiers": ["rewards.math:numeric_match",
                                        "tests.fixtures.tasks:starts_with_digit"],
        "schedule": {"policy": "relift", "args": {"buffer_size": 3}},
        "checkpoint.keep_last": 1})


@pytest.fixture
def problems(tmp_path):
    path = tmp_path / "problems.jsonl"
    with open(path, "w") as f:
        for i in range(6):  # 4 prompts a step: step 2 ends in the second pass
            a, b = 3 * i + 1, 7 - i
            f.write(json.dumps({"question": f"Sam has {a} pens and finds {b} more. How many "
                                            "pens does he have?",
                                "answer": str(a + b), "solution": f"{a} + {b} = {a + b}"})
                    + "\n")
        # longer than the engine's room for a prompt: skipped in every pass, and counted
        f.write(json.dumps({"question": "Why? " * 60, "answer": "0", "solution": "0"}) + "\n")
    return path


def _run(recipe, resume=None, until=None):
    """The recipe's steps; with ``until``, those up to it, then the stop a SIGTERM makes
    (``Controller.stop``: a checkpoint, with the steps in flight)."""
    c = Controller(recipe, resume=resume).setup()
    try:
        per_step = {}
        if c.start_step == 0:
            c.evaluate(0)
        for step in range(c.start_step + 1, (until or recipe.steps) + 1):
            per_step[step] = c.train_step(step)
        if until:
            assert c.stop(until)["step"] == until
        weights = c.learner.call(c.learner.fanout("full_state_dict"))[0]
        return per_step, weights, c.schedule.state_dict(), c.version
    finally:
        c.shutdown()


@pytest.mark.parametrize("k,lora", [(0, False), pytest.param(1, False, marks=pytest.mark.long),
                                    pytest.param(0, True, id="lora")])
def test_stop_and_resume_matches_a_straight_run(ray_local, make_chat_recipe, tmp_path,
                                                problems, k, lora):
    """(lora: LoRA adapters on ZeRO stage 0, their default — the adapters and their optimizer
    states checkpointed; the export writes the merged folder and the adapter folder.)"""
    straight, w_a, sched_a, v_a = _run(_recipe(make_chat_recipe, tmp_path / "a", 4, problems, k,
                                               lora=lora))
    # the straight run drains its pipeline into checkpoints at steps 2 and 4 (no effect on
    # what it trains on); this one checkpoints only when stopped after step 2
    first, _, _, _ = _run(_recipe(make_chat_recipe, tmp_path / "b", 4, problems, k, every=0,
                                  lora=lora), until=2)
    ckpt = tmp_path / "b" / "checkpoints" / "step_000002"
    cursor = json.loads((ckpt / "controller.json").read_text())["cursor"]
    assert cursor["epoch"] == 1 and cursor["skipped"] >= 1
    assert k or 0 < cursor["offset"] < 7  # lockstep: stopped in the middle of the second pass
    # 8 prompts kept in 2 steps, and 4 more drawn for the step in flight
    assert cursor["offset"] + 7 == 8 + 4 * k + cursor["skipped"]
    assert (ckpt / "inflight.pkl").is_file() == (k == 1)
    # (checkpointing at step 4, which the export below reads)
    second, w_b, sched_b, v_b = _run(_recipe(make_chat_recipe, tmp_path / "b", 4, problems, k,
                                             lora=lora), resume="")
    assert sorted(second) == [3, 4]
    keys = ["reward/mean", "rl/loss", "relift/buffer_depth", "response/length_mean",
            "data/prompts_dropped_total", "rollout/weight_version"]
    if k:  # step 3's rollouts came from the weights of step 1, one sync behind
        keys += ["rollout/staleness", "rl/logprob_diff"]
        assert [straight[s]["rollout/staleness"] for s in (2, 3, 4)] == [1.0, 1.0, 1.0]
    for step in (3, 4):
        for key in keys:
            assert second[step][key] == pytest.approx(straight[step][key], rel=1e-6, abs=1e-9)
    assert sched_a == sched_b and sched_a["triggers"] >= 1
    assert v_a == v_b
    for name in w_a:
        torch.testing.assert_close(w_b[name], w_a[name], rtol=0, atol=1e-7)
    if not k:
        _export_loads_in_transformers_and_vllm(tmp_path / "b", tmp_path / "exported", w_b, lora)


VLLM_GREEDY = """
import json, sys
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], max_model_len=64, enforce_eager=True, dtype="float32")
outs = llm.generate(json.loads(sys.argv[2]), SamplingParams(temperature=0, max_tokens=5))
print("GREEDY" + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
"""


def _export_loads_in_transformers_and_vllm(run_dir, out, weights, lora=False):
    """`braid export` of the run's latest checkpoint: transformers loads exactly the learner's
    weights, and vLLM (a fresh process) decodes greedily exactly what transformers does."""
    import json
    import os
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    from orchestrator.cli import main
    from tests.fixtures.greedy import hf_greedy

    assert main(["export", str(run_dir), str(out)]) == 0
    state = AutoModelForCausalLM.from_pretrained(out).state_dict()
    adapter = out.with_name(out.name + "-adapter")  # a LoRA run's adapters, as a peft folder
    assert adapter.is_dir() == lora
    if lora:  # peft's own merge of the adapter folder into the base model: the same weights
        from peft import PeftModel

        from orchestrator import checkpoint

        base = checkpoint.read_state(checkpoint.find(run_dir, None))["model_path"]
        merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                           str(adapter)).merge_and_unload().state_dict()
        for name, w in weights.items():
            torch.testing.assert_close(merged[name], w, rtol=0, atol=1e-6)
    for name, w in weights.items():
        torch.testing.assert_close(state[name], w, rtol=0, atol=0)
    prompts = ["12+7=", "3+4=", "55+5=", "9+9="]
    expected = hf_greedy(out, prompts, 5)
    proc = subprocess.run([sys.executable, "-c", VLLM_GREEDY, str(out), json.dumps(prompts)],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, VLLM_LOGGING_LEVEL="WARNING"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.split("GREEDY", 1)[1].splitlines()[0])
    assert got == expected
