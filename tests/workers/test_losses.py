import torch

from workers.learner import losses


def test_pack_aligns_completion_tokens():
    b = losses.pack([[1, 5, 6], [1, 7]], [[8, 2], [9, 10, 2]], pad_id=0,
                    advantages=[0.5, -1.0], old_logprobs=[[-0.1, -0.2], [-0.3, -0.4, -0.5]])
    assert b.input_ids.tolist() == [[1, 5, 6, 8, 2], [1, 7, 9, 10, 2]]
    # logits at t predict token t+1: completion of row 0 starts at token 3 -> position 2
    assert b.loss_mask.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
    assert torch.allclose(b.old_logprobs[0], torch.tensor([0, 0, -0.1, -0.2]))
    assert torch.allclose(b.old_logprobs[1], torch.tensor([0, -0.3, -0.4, -0.5]))


def test_empty_pack_is_a_zero_weight_row():
    b = losses.pack([], [], pad_id=0)
    assert b.loss_mask.sum() == 0 and b.seq_weight.tolist() == [0.0]


def test_on_policy_grpo_gradient_is_minus_advantage_times_grad_logp():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 11, requires_grad=True)
    b = losses.pack([[1, 2], [1, 3]], [[4, 5], [6, 7]], pad_id=0, advantages=[1.0, -2.0])
    logp, _ = losses.token_logprobs(logits, b.input_ids)
    b.old_logprobs = logp.detach() * b.loss_mask
    per_token, diag = losses.grpo_loss(logp, b, 0.2, 0.2)
    loss = losses.aggregate(per_token, b.loss_mask, "token_mean", 4, 2)
    loss.backward()
    g1 = logits.grad.clone()
    logits.grad = None
    logp2, _ = losses.token_logprobs(logits, b.input_ids)
    ref = -(b.advantages[:, None] * logp2 * b.loss_mask).sum() / 4
    ref.backward()
    assert torch.allclose(g1, logits.grad, atol=1e-6)
    assert diag["clipfrac"].sum() == 0


def test_clip_stops_gradient_beyond_the_trust_region():
    logits = torch.zeros(1, 3, 5, requires_grad=True)
    b = losses.pack([[1]], [[2, 3]], pad_id=0, advantages=[1.0],
                    old_logprobs=[[-3.0, -3.0]])  # ratio = exp(-log5 + 3) ~ 4 > 1.2
    logp, _ = losses.token_logprobs(logits, b.input_ids)
    per_token, diag = losses.grpo_loss(logp, b, 0.2, 0.2)
    (per_token * b.loss_mask).sum().backward()
    assert float(logits.grad.abs().sum()) == 0.0
    assert diag["clipfrac"][0, :2].tolist() == [1.0, 1.0]


def test_k3_kl_is_zero_at_the_reference_and_positive_elsewhere():
    logp = torch.tensor([[-1.0, -2.0]])
    b = losses.pack([[1]], [[2, 3]], pad_id=0, advantages=[0.0], old_logprobs=[[-1.0, -2.0]],
                    ref_logprobs=[[-1.0, -2.0]])
    _, d = losses.grpo_loss(logp, b, 0.2, 0.2, kl_coef=1.0)
    assert torch.allclose(d["kl"], torch.zeros(1, 2))
    b.ref_logprobs = torch.tensor([[-1.5, -1.0]])
    _, d = losses.grpo_loss(logp, b, 0.2, 0.2, kl_coef=1.0)
    assert (d["kl"] > 0).all()


def test_aggregation_modes():
    per_token = torch.tensor([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert float(losses.aggregate(per_token, mask, "token_mean", 4, 2)) == 7 / 4
    assert float(losses.aggregate(per_token, mask, "seq_mean_token_mean", 4, 2)) == (1 + 4) / 2
