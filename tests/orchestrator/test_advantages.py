"""Advantage estimators against small cases computed by hand from each paper's formula."""

import math

import pytest

from core.errors import RecipeError
from orchestrator.advantages import advantages, estimator
from orchestrator.config import AlgorithmConfig

ALGO = AlgorithmConfig()
# group 0: four samples, one correct; group 1: a group of one (e.g. the others were dropped)
REWARDS, GROUPS, LENGTHS = [1.0, 0.0, 0.0, 0.0, 1.0], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1]


def _adv(name, rewards=REWARDS, groups=GROUPS, lengths=LENGTHS, **algo):
    a = AlgorithmConfig(**algo) if algo else ALGO
    return advantages(estimator(name), rewards, groups, lengths, a, name)


def test_grpo_by_hand():
    # mean 1/4, sample std sqrt((3/4)^2 + 3 (1/4)^2) / 3) = 1/2: (1 - 1/4) / (1/2) = 3/2,
    # (0 - 1/4) / (1/2) = -1/2; a group of one: mean 0, std 1 (verl), so its reward
    assert _adv("grpo") == pytest.approx([1.5, -0.5, -0.5, -0.5, 1.0], abs=1e-5)
    # std_normalize false and Dr. GRPO: r - mean
    assert _adv("grpo", std_normalize=False) == pytest.approx([0.75, -0.25, -0.25, -0.25, 1.0])
    assert _adv("drgrpo") == pytest.approx([0.75, -0.25, -0.25, -0.25, 1.0])
    # equal rewards: no signal
    assert _adv("grpo", [1.0, 1.0], [0, 0], [3, 4]) == [0.0, 0.0]


def test_rloo_by_hand():
    # leave-one-out baseline: 1 - mean(0, 0, 0) = 1; 0 - mean(1, 0, 0) = -1/3
    assert _adv("rloo") == pytest.approx([1.0, -1 / 3, -1 / 3, -1 / 3, 1.0])
    # = G / (G - 1) (r - mean): 4/3 * 3/4 = 1
    assert _adv("rloo", [0.5, 0.0], [0, 0], [1, 1]) == pytest.approx([0.5, -0.5])


def test_reinforce_pp_by_hand():
    # returns whitened over tokens: values 1 (1 token) and 0 (3 tokens): token mean 1/4,
    # unbiased variance (3/4^2 + 3 * 1/4^2) / 3 = 1/4, std 1/2
    assert _adv("reinforce_pp", [1.0, 0.0], [0, 1], [1, 3]) == pytest.approx([1.5, -0.5],
                                                                              abs=1e-6)
    # works with one sample per prompt: the batch is the baseline
    assert _adv("reinforce_pp", [1.0, 0.0, 0.0], [0, 1, 2], [2, 2, 2])[0] > 0


def test_reinforce_pp_baseline_by_hand():
    # r - group mean: 0.5, -0.5, 0, 0; over 2 + 2 + 1 + 3 = 8 tokens: mean 0, unbiased
    # variance 4 * 0.25 / 7 = 1/7: 0.5 * sqrt(7)
    got = _adv("reinforce_pp_baseline", [1.0, 0.0, 1.0, 1.0], [0, 0, 1, 1], [2, 2, 1, 3])
    assert got == pytest.approx([0.5 * math.sqrt(7), -0.5 * math.sqrt(7), 0.0, 0.0], abs=1e-6)


def test_a_users_estimator_by_import_path_and_its_contract():
    assert _adv("tests.fixtures.algos:best_of_group") == [1.0, -1.0, -1.0, -1.0, 0.0]
    with pytest.raises(ValueError, match="returned 1 advantages for 5 samples"):
        _adv("tests.fixtures.algos:wrong_length")
    with pytest.raises(ValueError, match="non-finite advantage for sample 0"):
        advantages(lambda r, g, n, a: [float("nan")] * len(r), [1.0], [0], [1], ALGO, "mine")
    with pytest.raises(RecipeError, match="algorithm.advantage: .* one of"):
        estimator("gae_typo")
    with pytest.raises(RecipeError, match="algorithm.advantage: no module named 'nowhere'"):
        estimator("nowhere:fn")


def test_gae_by_hand():
    """Values (0.5, 0.8), reward 1 on the last token, gamma 1, lambda 0.95:
    delta_1 = 1 + 0 - 0.8 = 0.2, A_1 = 0.2; delta_0 = 0 + 0.8 - 0.5 = 0.3,
    A_0 = 0.3 + 0.95 * 0.2 = 0.49; returns A + V = (0.99, 1.0). gamma 0.5, lambda 1:
    delta_1 = 0.2, delta_0 = 0.5 * 0.8 - 0.5 = -0.1, A_0 = -0.1 + 0.5 * 0.2 = 0.0."""
    from orchestrator.advantages import gae

    algo = AlgorithmConfig(gae_whiten=False)
    adv, ret = gae([1.0, 0.0], [[0.5, 0.8], []], algo)
    assert adv[0] == pytest.approx([0.49, 0.2]) and ret[0] == pytest.approx([0.99, 1.0])
    assert adv[1] == [] and ret[1] == []  # an empty completion has no tokens
    adv, _ = gae([1.0], [[0.5, 0.8]], AlgorithmConfig(gae_whiten=False, gamma=0.5, lam=1.0))
    assert adv[0] == pytest.approx([0.0, 0.2])
    # whitened over the tokens: 0.49 and 0.2 -> mean 0.345, sample std 0.205
    adv, ret = gae([1.0], [[0.5, 0.8]], ALGO)
    assert adv[0] == pytest.approx([1 / math.sqrt(2), -1 / math.sqrt(2)], abs=1e-4)
    assert ret[0] == pytest.approx([0.99, 1.0])  # the critic's targets are not whitened


def test_gae_over_a_trajectory_skips_the_environments_tokens():
    """A trajectory's loss mask (1 1 0 0 1: two sampled tokens, the environment's two, one
    sampled): GAE runs over the policy's tokens back to back — values (0.5, 0.8, 0.6) with
    gamma 1, lambda 1: A = (1 - 0.5, 1 - 0.8, 1 - 0.6) — the environment's get advantage 0 and
    return V; the values at masked positions change nothing."""
    from orchestrator.advantages import gae

    algo = AlgorithmConfig(gae_whiten=False, gamma=1.0, lam=1.0)
    mask = [1, 1, 0, 0, 1]
    adv, ret = gae([1.0], [[0.5, 0.8, 7.0, -3.0, 0.6]], algo, masks=[mask])
    assert adv[0] == pytest.approx([0.5, 0.2, 0.0, 0.0, 0.4])
    assert ret[0] == pytest.approx([1.0, 1.0, 7.0, -3.0, 1.0])
    other, _ = gae([1.0], [[0.5, 0.8, 0.0, 0.0, 0.6]], algo, masks=[mask])
    assert other == adv
    # whitened over the policy's tokens only: (0.5, 0.2, 0.4) -> mean 1.1/3, masked stay 0
    w, _ = gae([1.0], [[0.5, 0.8, 7.0, -3.0, 0.6]], AlgorithmConfig(gamma=1.0, lam=1.0),
               masks=[mask])
    kept = [w[0][t] for t in (0, 1, 4)]
    assert sum(kept) == pytest.approx(0.0, abs=1e-6) and w[0][2:4] == [0.0, 0.0]


def test_the_critic_value_loss_by_hand():
    import torch

    from workers.learner.critic import value_loss

    v, r, old = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.2])
    # clip 0.5: V_clip = (0.5, 0.0): token 0 max(1, 0.25) = 1 -> 0.5; token 1: V moved -0.2,
    # inside the clip: max(1, 1) -> 0.5
    loss, clipped = value_loss(v, r, old, 0.5)
    assert loss.tolist() == pytest.approx([0.5, 0.5]) and clipped.tolist() == [0.0, 0.0]
    # V_old = 2 for token 0: V_clip = 1.5 (V moved -1, clipped to -0.5): (1.5)^2 > 1^2
    loss, clipped = value_loss(v, r, torch.tensor([2.0, 0.2]), 0.5)
    assert loss.tolist() == pytest.approx([0.5 * 2.25, 0.5]) and clipped.tolist() == [1.0, 0.0]
    loss, _ = value_loss(v, r, old, None)
    assert loss.tolist() == pytest.approx([0.5, 0.5])
