import math

import pytest
import torch
import torch.nn.functional as F

from orchestrator.config import AlgorithmConfig
from workers.learner import losses
from workers.learner.packing import balance, micro_batches, pack, plan, unpack


def _pg(logp, b, **algo):
    """The RL term with the default PPO-clip loss under these algorithm options."""
    return losses.policy_gradient_loss(losses.ppo_clip_loss, logp, b, AlgorithmConfig(**algo))


class Head(torch.nn.Module):
    """The identity as a vocabulary projection: the 'hidden states' are the logits."""

    def forward(self, h):
        return h


def _logits_logprobs(logits, b, temperature=1.0):
    return losses.token_logprobs(logits[0].index_select(0, b.positions), b.targets, Head(),
                                 temperature)[0]


def test_pack_concatenates_rows_and_restarts_positions():
    b = pack([[1, 5, 6], [1, 7]], [[8, 2], [9, 10, 2]], pad_id=0,
             advantages=[0.5, -1.0], old_logprobs=[[-0.1, -0.2], []])
    assert b.input_ids.tolist() == [[1, 5, 6, 8, 2, 1, 7, 9, 10, 2]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]]
    # logits at t predict token t+1: row 0's completion starts at token 3 -> position 2
    assert b.positions.tolist() == [2, 3, 6, 7, 8]
    assert b.targets.tolist() == [8, 2, 9, 10, 2]
    assert b.advantages.tolist() == [0.5, 0.5, -1.0, -1.0, -1.0]
    assert b.seq_len.tolist() == [2, 2, 3, 3, 3] and b.row.tolist() == [0, 0, 1, 1, 1]
    assert torch.allclose(b.old_logprobs[:2], torch.tensor([-0.1, -0.2]))
    assert torch.isnan(b.old_logprobs[2:]).all()  # no behaviour log-probs: on-policy
    assert unpack(b.targets, b, 2) == [[8, 2], [9, 10, 2]]


def test_empty_pack_is_a_zero_weight_row():
    b = pack([], [], pad_id=0)
    assert b.weight.tolist() == [0.0] and b.n_tokens == 0


def test_balance_deals_rows_by_tokens_and_micro_batches_respect_the_budget():
    lengths = [100, 10, 90, 20, 30, 80, 5, 5]
    ranks = balance(lengths, 2)
    loads = [sum(lengths[i] for i in r) for r in ranks]
    assert sorted(i for r in ranks for i in r) == list(range(8))
    assert abs(loads[0] - loads[1]) <= 10, loads  # round-robin: 225 vs 115
    mbs = micro_batches(list(range(8)), lengths, max_tokens=100, max_rows=3)
    assert sorted(i for mb in mbs for i in mb) == list(range(8))
    assert all(sum(lengths[i] for i in mb) <= 100 and len(mb) <= 3 for mb in mbs)
    assert micro_batches([0, 1], [300, 10], max_tokens=100, max_rows=None) == [[0], [1]]
    p = plan(lengths, 3, max_tokens=60, max_rows=None)
    assert len({len(r) for r in p}) == 1  # every rank runs the same number of micro-batches


def test_chunked_logprobs_and_entropy_equal_one_pass_values_and_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    weights = torch.randn(37)
    results = []
    # n_chunks: extra empty passes (what a ZeRO-3 rank with fewer tokens runs) change nothing
    for chunk, n_chunks in ((None, None), (8, None), (64, None), (8, 9)):
        head.zero_grad()
        hidden.grad = None
        logp, ent = losses.token_logprobs(hidden, targets, head, 0.7, True, chunk, softcap=5.0,
                                          n_chunks=n_chunks)
        ((logp * weights).sum() + ent.sum()).backward()
        results.append((logp.detach(), ent.detach(), hidden.grad.clone(),
                        head.weight.grad.clone()))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # against the formula: log softmax(softcap * tanh(z / softcap) / T)
    z = 5.0 * torch.tanh(head(hidden).detach() / 5.0) / 0.7
    torch.testing.assert_close(results[0][0], F.log_softmax(z, -1)[torch.arange(37), targets])


@pytest.mark.parametrize("kernel", ["braid_varlen_sdpa", "sdpa"])
def test_packed_rows_equal_padded_rows_in_logprobs_loss_and_gradients(tiny_model, kernel):
    """Packing (one sequence, positions restarting per row) gives the same per-token log-probs,
    loss and gradients as right-padded rows with an attention mask: with braid's varlen
    attention (the CPU default) and with transformers' sdpa and its block-diagonal mask."""
    from transformers import AutoModelForCausalLM

    from workers.learner.policy import TokenLogprobs, attn_implementation

    # rows of 7, 7, 8, 5, 2 and 12 tokens: braid's kernel groups them by power-of-two length
    # (4-7, 8-15, 2-3) and pads within a group
    prompts = [[1, 5, 6, 7], [1, 8], [1, 9, 10, 11, 12, 13], [1, 21, 22], [1], [1, 5, 9, 13]]
    completions = [[14, 15, 2], [16, 17, 18, 19, 2], [20, 2], [23, 2], [24], [7] * 7 + [2]]
    adv = [1.0, -0.5, 2.0, 0.3, -1.0, 0.7]
    lm = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32,
                                              attn_implementation="sdpa")
    # padded reference, computed independently of braid's packing
    L = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    attn = torch.zeros(len(prompts), L, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, :len(p + c)] = torch.tensor(p + c)
        attn[i, :len(p + c)] = 1
    logp_all = F.log_softmax(lm(input_ids=ids, attention_mask=attn).logits.float(), -1)
    padded = [logp_all[i, len(p) - 1:len(p) + len(c) - 1].gather(-1, torch.tensor(c)[:, None])
              .squeeze(-1) for i, (p, c) in enumerate(zip(prompts, completions))]
    n_tok = sum(len(c) for c in completions)
    (-sum(a * lp.sum() for a, lp in zip(adv, padded)) / n_tok).backward()
    ref_grads = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad()

    lm.set_attn_implementation(attn_implementation(kernel))
    assert lm.config._attn_implementation == kernel
    model = TokenLogprobs(lm, chunk_tokens=4)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in lm.named_parameters()]
    b = pack(prompts, completions, 0, advantages=adv)
    logp, _ = model(b)
    for got, want in zip(unpack(logp.detach(), b, len(prompts)), padded):
        torch.testing.assert_close(torch.tensor(got), want.detach(), rtol=1e-5, atol=1e-5)
    per_token, _ = _pg(logp, b)  # on-policy: -A * ratio, ratio = 1
    losses.aggregate(per_token, b, "token_mean", n_tok, len(prompts)).backward()
    for n, p in lm.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6)


def test_on_policy_grpo_gradient_is_minus_advantage_times_grad_logp():
    torch.manual_seed(0)
    logits = torch.randn(1, 8, 11, requires_grad=True)
    b = pack([[1, 2], [1, 3]], [[4, 5], [6, 7]], pad_id=0, advantages=[1.0, -2.0])
    logp = _logits_logprobs(logits, b)
    per_token, diag = _pg(logp, b)
    losses.aggregate(per_token, b, "token_mean", 4, 2).backward()
    g1 = logits.grad.clone()
    logits.grad = None
    ref = -(b.advantages * _logits_logprobs(logits, b)).sum() / 4
    ref.backward()
    assert torch.allclose(g1, logits.grad, atol=1e-6)
    assert diag["clipfrac"].sum() == 0


def test_clip_stops_gradient_beyond_the_trust_region():
    logits = torch.zeros(1, 3, 5, requires_grad=True)
    b = pack([[1]], [[2, 3]], pad_id=0, advantages=[1.0],
             old_logprobs=[[-3.0, -3.0]])  # ratio = exp(-log5 + 3) ~ 4 > 1.2
    logp = _logits_logprobs(logits, b)
    per_token, diag = _pg(logp, b)
    per_token.sum().backward()
    assert float(logits.grad.abs().sum()) == 0.0
    assert diag["clipfrac"].tolist() == [1.0, 1.0]


def test_truncated_importance_sampling_by_hand():
    """tis_cap: the gradient of each token is -A * min(p / mu, C) * d log p (no clip: the ratio
    is to the proximal policy, itself), where mu is the behaviour probability. By hand, a
    uniform 5-way distribution p = 0.2: behaviour 0.1 gives rho = 2, truncated to C = 1.5;
    behaviour 0.4 gives rho = 0.5; a NaN behaviour log-prob (on-policy) gives 1."""
    logits = torch.zeros(1, 4, 5, requires_grad=True)
    b = pack([[1]], [[2, 3, 4]], pad_id=0, advantages=[1.0],
             old_logprobs=[[math.log(0.1), math.log(0.4), float("nan")]])
    logp = _logits_logprobs(logits, b)
    per_token, diag = _pg(logp, b, tis_cap=1.5)
    torch.testing.assert_close(diag["tis_weight"], torch.tensor([1.5, 0.5, 1.0]))
    assert diag["tis_truncated"].tolist() == [1.0, 0.0, 0.0]
    assert diag["clipfrac"].sum() == 0
    torch.testing.assert_close(per_token.detach(), torch.tensor([-1.5, -0.5, -1.0]))
    per_token.sum().backward()
    # d(-w log p_t)/d logit_t = -w (1 - 0.2) at the sampled token
    got = [float(logits.grad[0, i, t]) for i, t in enumerate((2, 3, 4))]
    assert got == pytest.approx([-1.5 * 0.8, -0.5 * 0.8, -1.0 * 0.8], abs=1e-6)
    # without the cap the same stale token (rho = 2 > 1.2) is clipped: no gradient
    logits.grad = None
    per_token, _ = _pg(_logits_logprobs(logits, b), b)
    per_token[0].backward()
    assert float(logits.grad.abs().sum()) == 0.0


def test_k3_kl_is_zero_at_the_reference_and_positive_elsewhere():
    logp = torch.tensor([-1.0, -2.0])
    b = pack([[1]], [[2, 3]], pad_id=0, advantages=[0.0], old_logprobs=[[-1.0, -2.0]],
             ref_logprobs=[[-1.0, -2.0]])
    _, d = _pg(logp, b, kl=1.0)
    assert torch.allclose(d["kl"], torch.zeros(2))
    b.ref_logprobs = torch.tensor([-1.5, -1.0])
    _, d = _pg(logp, b, kl=1.0)
    # k3 = exp(d) - d - 1 with d = ref - logp: d = -0.5 and 1.0
    torch.testing.assert_close(d["kl"], torch.tensor([0.1065306597, 0.7182818285]))


def test_aggregation_modes():
    b = pack([[1], [1]], [[2, 3, 4], [5]], pad_id=0)
    per_token = torch.tensor([1.0, 1.0, 1.0, 4.0])
    assert float(losses.aggregate(per_token, b, "token_mean", 4, 2)) == 7 / 4
    assert float(losses.aggregate(per_token, b, "seq_mean_token_mean", 4, 2)) == (1 + 4) / 2
    # Dr. GRPO: each sequence's token sum over the constant 4, averaged over 2 sequences
    assert float(losses.aggregate(per_token, b, "seq_mean_token_sum_norm", 4, 2, 4)) == \
        (3 / 4 + 4 / 4) / 2
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        losses.aggregate(per_token, b, "sum", 4, 2)


def test_empty_prompt_is_refused_and_a_filler_token_cannot_poison_the_loss():
    with pytest.raises(ValueError, match="empty prompt"):
        pack([[]], [[3, 4]], pad_id=0)
    b = pack([], [], pad_id=0)  # the zero-weight filler row
    per_token = torch.tensor([float("inf")], requires_grad=True)  # e.g. its k3 KL overflowed
    loss = losses.aggregate(per_token, b, "token_mean", 4, 1)
    loss.backward()
    assert float(loss) == 0.0 and float(per_token.grad) == 0.0


# --- policy losses, by hand ------------------------------------------------------------------
# Logits all 0 over 5 tokens: p = 0.2 for every token, log p = -log 5, and the gradient of
# log p_t with respect to its own logit is 1 - 0.2 = 0.8.
LOG5 = math.log(5.0)


def _uniform(n_tokens, **pack_args):
    logits = torch.zeros(1, n_tokens + 1, 5, requires_grad=True)
    b = pack(**pack_args, pad_id=0)
    return logits, b, _logits_logprobs(logits, b)


def test_no_clip_is_minus_advantage_times_ratio():
    # old log p = -3: ratio = exp(3 - log 5) = 4.017; clip 0.2 would stop this token
    logits, b, logp = _uniform(1, prompts=[[1]], completions=[[2]], advantages=[1.0],
                               old_logprobs=[[-3.0]])
    per_token, diag = _pg(logp, b, clip=None)
    ratio = math.exp(3.0 - LOG5)
    assert float(per_token) == pytest.approx(-ratio) and float(diag["clipfrac"]) == 0.0
    per_token.sum().backward()
    assert float(logits.grad[0, 0, 2]) == pytest.approx(-ratio * 0.8, rel=1e-5)
    with pytest.raises(ValueError, match="clip_high is set but clip is null"):
        AlgorithmConfig(clip=None, clip_high=0.28)


def test_dual_clip_bounds_a_negative_advantage_token():
    # A = -1, ratio 4.017: PPO's max(-A r, -A clip(r)) = 4.017; dual-clip c = 3 caps it at 3
    # and the token gets no gradient
    logits, b, logp = _uniform(1, prompts=[[1]], completions=[[2]], advantages=[-1.0],
                               old_logprobs=[[-3.0]])
    per_token, _ = _pg(logp, b)
    assert float(per_token) == pytest.approx(math.exp(3.0 - LOG5))
    per_token, diag = _pg(logp, b, dual_clip=3.0)
    assert float(per_token) == pytest.approx(3.0) and float(diag["clipfrac"]) == 1.0
    per_token.sum().backward()
    assert float(logits.grad.abs().sum()) == 0.0
    with pytest.raises(ValueError):
        AlgorithmConfig(dual_clip=1.0)  # c must exceed 1


def test_log_ratio_clamp_keeps_a_far_stale_token_finite():
    # log-ratio -log 5 + 100 = 98.4: exp overflows float32 unless clamped to 20
    _, b, logp = _uniform(1, prompts=[[1]], completions=[[2]], advantages=[1.0],
                          old_logprobs=[[-100.0]])
    assert float(_pg(logp, b, clip=None)[0]) == pytest.approx(-math.exp(20.0), rel=1e-5)
    assert math.isinf(float(_pg(logp, b, clip=None, log_ratio_clamp=None)[0]))


def test_k3_kl_clamp():
    # log-prob gap 25 to the reference: k3 = e^25 - 26 = 7.2e10 as it was; verl clamps the gap
    # to 20 (always) and k3 to 10 (kl_clamp), and the clamped token's gradient is 0, not NaN
    logits, b, logp = _uniform(1, prompts=[[1]], completions=[[2]], advantages=[0.0],
                               ref_logprobs=[[25.0 - LOG5]])
    _, diag = _pg(logp, b, kl=1.0, kl_clamp=None)
    assert float(diag["kl"]) == pytest.approx(math.exp(20.0) - 21.0, rel=1e-5)
    per_token, diag = _pg(logp, b, kl=1.0)
    assert float(diag["kl"]) == 10.0
    per_token.sum().backward()
    assert float(logits.grad.abs().sum()) == 0.0


def test_gspo_sequence_ratio_by_hand():
    """Sequence 0 (A = 1): token log-ratios -0.1 and 0.3, mean 0.1, so both tokens carry
    s = e^0.1 = 1.105 and the gradient -A * s * d log p_t; sequence 1 (A = -1) is on-policy:
    s = 1. With clip 0.05 the ratio 1.105 > 1.05 is clipped (A > 0): no gradient."""
    gspo = losses.policy_loss("gspo")
    old = [[-LOG5 + 0.1, -LOG5 - 0.3], [-LOG5]]
    logits, b, logp = _uniform(3, prompts=[[1], [1]], completions=[[2, 3], [4]],
                               advantages=[1.0, -1.0], old_logprobs=old)
    per_token, diag = losses.policy_gradient_loss(gspo, logp, b, AlgorithmConfig())
    s = math.exp(0.1)
    assert per_token.tolist() == pytest.approx([-s, -s, 1.0], rel=1e-5)
    assert diag["clipfrac"].tolist() == [0.0, 0.0, 0.0]
    per_token.sum().backward()
    got = [float(logits.grad[0, i, t]) for i, t in ((0, 2), (1, 3))]
    assert got == pytest.approx([-s * 0.8, -s * 0.8], rel=1e-5)
    logits.grad = None
    per_token, diag = losses.policy_gradient_loss(
        gspo, _logits_logprobs(logits, b), b, AlgorithmConfig(clip=0.05))
    assert diag["clipfrac"].tolist() == [1.0, 1.0, 0.0]
    per_token[:2].sum().backward()
    assert float(logits.grad.abs().sum()) == 0.0


def test_a_users_policy_loss_by_import_path_and_its_contract():
    from core.errors import RecipeError

    mine = losses.policy_loss("tests.fixtures.algos:vanilla_pg")
    _, b, logp = _uniform(2, prompts=[[1]], completions=[[2, 3]], advantages=[2.0])
    per_token, diag = losses.policy_gradient_loss(mine, logp, b, AlgorithmConfig())
    assert per_token.tolist() == [-2.0, -2.0] and diag["pos_adv"].tolist() == [1.0, 1.0]
    bad = losses.policy_loss("tests.fixtures.algos:per_sequence")
    with pytest.raises(ValueError, match="not one per token"):
        losses.policy_gradient_loss(bad, logp, b, AlgorithmConfig(policy_loss="x:per_sequence"))
    with pytest.raises(RecipeError, match="algorithm.policy_loss"):
        losses.policy_loss("ppo_clipp")


def test_normalisers_count_nonempty_sequences_and_joint_terms_share_them():
    """A term's normaliser: its completion tokens and its sequences with at least one token
    (an empty completion has no loss and must not dilute seq_mean_*); terms with one ``joint``
    key (LUFFY's samples and demonstrations) share the sum of theirs."""
    from dataclasses import replace

    from workers.learner.deepspeed import DeepSpeedLearner
    from workers.learner.terms import SFT, OffPolicyPG

    def totals(terms):
        return DeepSpeedLearner._totals(terms, [t.rows() for t in terms])

    a = SFT(prompts=[[1]] * 3, completions=[[2, 3], [], [4]])
    b = OffPolicyPG(prompts=[[1]], completions=[[5, 6, 7]], advantages=[1.0])
    assert totals([a, b]) == [(3.0, 2.0), (3.0, 1.0)]
    assert totals([replace(a, joint="luffy"), replace(b, joint="luffy")]) == [(6.0, 3.0)] * 2
    masked = replace(a, masks=[[1, 0], [], None])  # a masked token does not count
    assert totals([masked]) == [(2.0, 2.0)]


@pytest.mark.parametrize("chunk", [None, 8])
def test_entropy_as_a_metric_has_no_graph_and_the_same_value(chunk):
    """Without an entropy bonus the learner still reports the entropy: the same values, but no
    graph (no vocabulary-wide tensor kept for the backward), and log-probs' gradients as ever."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    got = {}
    for grad in (True, False):
        hidden.grad = None
        logp, ent = losses.token_logprobs(hidden, targets, head, 0.7, True, chunk,
                                          entropy_grad=grad)
        assert ent.requires_grad is grad
        logp.sum().backward()
        got[grad] = (logp.detach(), ent.detach(), hidden.grad.clone())
    for a, b in zip(got[True], got[False]):
        torch.testing.assert_close(a, b)
    assert (got[False][1] > 0).all() and (got[False][1] < math.log(50)).all()
