"""DeepSpeed ZeRO-3 learner ranks as real Ray actors (gloo on CPU).

Gradient accumulation and data parallelism must not change the update: DeepSpeed accumulation
bugs have silently skewed published SFT/RL comparisons. The first AdamW step is close to
sign(grad) and would hide a scale error, so the test compares the global gradient norm of the
first step and the weights after a second step on different data.
"""

import math
import random
from dataclasses import replace

import pytest
import torch

from orchestrator.groups import WorkerError, WorkerGroup
from orchestrator.setup import resolve_recipe
from workers.learner.terms import SFT, OffPolicyPG, PolicyGradient
from workers.types import Rollouts

pytestmark = pytest.mark.slow


def _rollouts(seed: int, n: int = 12) -> tuple[Rollouts, list[float]]:
    rng = random.Random(seed)
    r = Rollouts([], [], [], [], [], [])
    for i in range(n):
        r.prompt_index.append(i // 4)
        r.prompt_ids.append([1] + [rng.randint(4, 20) for _ in range(rng.randint(2, 6))])
        c = [rng.randint(4, 20) for _ in range(rng.randint(1, 5))]
        r.completion_ids.append(c)
        r.logprobs.append([])  # on-policy: the learner's own log-probs are the old ones
        r.texts.append("")
        r.finish_reasons.append("stop")
    adv = [rng.uniform(-1.5, 1.5) for _ in range(n)]
    return r, adv


def _train(make_recipe, replicas: int, micro: int | None, max_tokens: int | None = None,
           **learner_args):
    recipe = make_recipe(**{"roles.learner.replicas": replicas,
                            "roles.learner.args": learner_args,
                            "algorithm.micro_batch_size": micro,
                            "algorithm.max_tokens_per_micro_batch": max_tokens,
                            "algorithm.grad_clip": 1e6})
    cls, args = resolve_recipe(recipe).roles["learner"]
    group = WorkerGroup("learner", recipe.roles.learner, recipe, cls, args, {})
    try:
        import ray

        addr, port = ray.get(group.actors[0].master_address.remote())
        group.call(group.fanout("setup", master_addr=addr, master_port=port), "setup")
        metrics = []
        for seed in (1, 2):
            r, adv = _rollouts(seed)
            term = PolicyGradient(rollouts=r, advantages=adv)
            metrics.append(group.call(group.fanout("update", [term]), "update")[0])
        state = group.call(group.fanout("full_state_dict"), "state")[0]
        return metrics, state
    finally:
        group.shutdown()


def test_micro_batches_and_ranks_give_the_same_update(ray_local, make_recipe):
    base_m, base_w = _train(make_recipe, replicas=1, micro=64)   # one big batch
    acc_m, acc_w = _train(make_recipe, replicas=2, micro=2)      # 2 ranks x 3 micro-batches
    odd_m, odd_w = _train(make_recipe, replicas=2, micro=4)      # uneven: 6 rows per rank
    # packed under a 20-token budget (rows are 4-12 tokens), checkpointed layers, 3-token
    # chunks through the vocabulary projection
    tok_m, tok_w = _train(make_recipe, replicas=2, micro=None, max_tokens=20,
                          gradient_checkpointing=True, logprob_chunk_tokens=3)
    for m in (acc_m, odd_m, tok_m):
        assert m[0]["rl/grad_norm"] == pytest.approx(base_m[0]["rl/grad_norm"], rel=1e-4)
        assert m[0]["rl/loss"] == pytest.approx(base_m[0]["rl/loss"], rel=1e-4, abs=1e-6)
        assert m[0]["rl/tokens"] == base_m[0]["rl/tokens"]
    for w in (acc_w, odd_w, tok_w):
        assert w.keys() == base_w.keys()
        for name in base_w:
            # Adam divides by sqrt(v): float-summation noise in tiny gradients shows up at
            # ~1e-6; a wrong accumulation scale moves weights by ~lr = 1e-3.
            torch.testing.assert_close(w[name], base_w[name], rtol=1e-4, atol=2e-5)
    assert base_m[0]["rl/grad_norm"] > 0


def test_probe_leaves_no_trace_and_named_optimizers_keep_their_own_moments(ray_local,
                                                                          make_recipe):
    """SASR's probe measures a gradient norm without moving weights or any optimizer state;
    ReLIFT's "sft" optimizer keeps moments apart from "main"."""
    import ray

    recipe = make_recipe(**{"algorithm.lr": 1e-2})
    cls, args = resolve_recipe(recipe).roles["learner"]
    group = WorkerGroup("learner", recipe.roles.learner, recipe, cls, args, {})
    try:
        addr, port = ray.get(group.actors[0].master_address.remote())
        group.call(group.fanout("setup", master_addr=addr, master_port=port), "setup")
        sft = SFT(prompts=[[1, 5, 6, 14, 7]] * 6, completions=[[8, 9, 2]] * 6)

        def moments():
            """Each named optimizer state's Adam moments (rank 0's partition), by name."""
            def read(learner):
                keys = learner._state_keys()
                return {name: [{k: v.clone() for k, v in state[p].items()
                                if torch.is_tensor(v)} for p in keys if p in state]
                        for name, state in learner._opt_states.items()}
            return ray.get(group.actors[0].__ray_call__.remote(read))

        def same(a, b):
            return len(a) == len(b) and all(x.keys() == y.keys() and all(
                torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))

        w0, m0 = group.call(group.fanout("full_state_dict"))[0], moments()
        probe = group.call(group.fanout("update", [sft], probe=True))[0]
        assert probe["probe/grad_norm"] > 0
        w1 = group.call(group.fanout("full_state_dict"))[0]
        for name in w0:
            assert torch.equal(w0[name], w1[name]), name
        m1 = moments()  # the probe's scratch moments are gone
        assert m1.keys() == {"main"} and same(m1["main"], m0["main"])
        m = group.call(group.fanout("update", [sft], "sft"))[0]
        assert m["optimizer/sft_steps"] == 1.0 and m["sft/loss"] > 0
        # the probe's gradient equals that of the real step taken from the same weights
        assert m["sft/grad_norm"] == pytest.approx(probe["probe/grad_norm"], rel=1e-5)
        after_sft = moments()
        assert same(after_sft["main"], m0["main"]) and after_sft["sft"]
        assert float(after_sft["sft"][0]["exp_avg"].abs().sum()) > 0
        r, adv = _rollouts(3)
        m2 = group.call(group.fanout("update", [PolicyGradient(rollouts=r,
                                                               advantages=adv)]))[0]
        assert m2["optimizer/main_steps"] == 1.0  # the first step of "main": fresh moments
        after_rl = moments()
        # "main" starts from zero moments: after one step exp_avg = (1 - beta1) g, exp_avg_sq
        # = (1 - beta2) g^2 of the RL gradient alone, and "sft"'s moments are untouched
        assert same(after_rl["sft"], after_sft["sft"])
        main = after_rl["main"][0]
        torch.testing.assert_close(main["exp_avg_sq"], 1e-3 * (main["exp_avg"] / 0.1) ** 2)
        assert not torch.equal(main["exp_avg"], after_sft["sft"][0]["exp_avg"])
        m3 = group.call(group.fanout("update", [sft], "sft"))[0]
        assert m3["optimizer/sft_steps"] == 2.0
        after_sft2 = moments()
        assert same(after_sft2["main"], after_rl["main"])
        assert not same(after_sft2["sft"], after_sft["sft"])
    finally:
        group.shutdown()


def test_ppo_mini_batches_and_epochs_take_several_steps_and_the_clip_acts(ray_local,
                                                                         make_recipe):
    """With behaviour log-probs from the initial weights, one step is on-policy (ratio 1); 2
    mini-batches x 2 epochs take 4 optimizer steps and the later ones see a ratio away from 1,
    which the clip acts on."""
    import ray

    from workers.base import WorkerContext
    from workers.reference import HFReference

    r, adv = _rollouts(5)
    base = make_recipe()
    ref = HFReference(WorkerContext("reference", 0, 1, base, HFReference.check_args(
        {}, "roles.reference.args")))
    ref.setup()
    r.logprobs = ref.logprobs(r)  # the initial policy's: vLLM's behaviour log-probs, in effect
    results = {}
    for mini, epochs in ((1, 1), (2, 2)):
        recipe = make_recipe(**{"algorithm.lr": 5e-2, "algorithm.clip": 0.05,
                                "algorithm.ppo_mini_batches": mini,
                                "algorithm.ppo_epochs": epochs})
        cls, args = resolve_recipe(recipe).roles["learner"]
        group = WorkerGroup("learner", recipe.roles.learner, recipe, cls, args, {})
        try:
            addr, port = ray.get(group.actors[0].master_address.remote())
            group.call(group.fanout("setup", master_addr=addr, master_port=port), "setup")
            term = PolicyGradient(rollouts=r, advantages=adv)
            results[mini, epochs] = group.call(group.fanout("update", [term], step=1))[0]
            if mini > 1:
                # an SFT-only update is one optimizer step whatever the PPO settings
                sft = SFT(prompts=[[1, 5, 6]] * 4, completions=[[8, 2]] * 4)
                m = group.call(group.fanout("update", [sft], "sft"))[0]
                assert m["optimizer/sft_steps"] == 1.0 and "sft/optimizer_steps" not in m
                # rows without behaviour log-probs would never be clipped: refused
                bare, _ = _rollouts(6)
                with pytest.raises(WorkerError, match="log-probs of every sampled token"):
                    group.call(group.fanout("update", [PolicyGradient(rollouts=bare,
                                                                      advantages=adv)]))
        finally:
            group.shutdown()
    one, ppo = results[1, 1], results[2, 2]
    assert one["optimizer/main_steps"] == 1.0 and "rl/optimizer_steps" not in one
    assert one["rl/logprob_diff"] < 1e-5 and one["rl/clipfrac"] == 0.0
    assert ppo["optimizer/main_steps"] == 4.0 and ppo["rl/optimizer_steps"] == 4.0
    assert ppo["rl/tokens"] == one["rl/tokens"]  # tokens of one pass
    assert ppo["rl/logprob_diff"] > 1e-3 and ppo["rl/clipfrac"] > 0.0


def test_luffy_demonstrations_at_the_sampling_temperature_and_loss_agg(ray_local, make_recipe):
    """The demonstrations' term is LUFFY's -A p / (p + gamma) with p at the sampling
    temperature (0.7 here), aggregated like the RL term (Dr. GRPO's token sum over 5 here),
    by hand from the reference worker's log-probs of the same weights."""
    import ray

    from workers.base import WorkerContext
    from workers.reference import HFReference

    recipe = make_recipe(**{"sampling.temperature": 0.7,
                            "algorithm.loss_agg": "seq_mean_token_sum_norm"})
    demos = Rollouts([0, 0], [[1, 5, 6], [1, 7]], [[8, 9, 2], [4, 4, 5, 6]], [[], []],
                     ["", ""], ["stop", "stop"])
    adv, gamma = [1.0, -0.5], 0.1
    ref = HFReference(WorkerContext("reference", 0, 1, recipe, HFReference.check_args(
        {}, "roles.reference.args")))
    ref.setup()
    expected = sum(-a * math.exp(lp) / (math.exp(lp) + gamma)
                   for a, row in zip(adv, ref.logprobs(demos, 0.7)) for lp in row) / 5 / 2
    cls, args = resolve_recipe(recipe).roles["learner"]
    group = WorkerGroup("learner", recipe.roles.learner, recipe, cls, args, {})
    try:
        addr, port = ray.get(group.actors[0].master_address.remote())
        group.call(group.fanout("setup", master_addr=addr, master_port=port), "setup")
        off = OffPolicyPG(prompts=demos.prompt_ids, completions=demos.completion_ids,
                          advantages=adv, gamma=gamma)
        m = group.call(group.fanout("update", [off], lr=0.0))[0]
    finally:
        group.shutdown()
    assert m["off/loss"] == pytest.approx(expected, rel=1e-4)


def test_luffy_terms_share_one_token_mean(ray_local, make_recipe):
    """LUFFY's on-policy samples and demonstrations are one token mean (its code concatenates
    them): with a joint normaliser each term's loss is its sum over the tokens of *both*; the
    demonstrations get the entropy bonus and the loss aggregation of the RL update."""
    import ray

    recipe = make_recipe(**{"algorithm.entropy": 0.01})
    cls, args = resolve_recipe(recipe).roles["learner"]
    group = WorkerGroup("learner", recipe.roles.learner, recipe, cls, args, {})
    try:
        addr, port = ray.get(group.actors[0].master_address.remote())
        group.call(group.fanout("setup", master_addr=addr, master_port=port), "setup")
        r, adv = _rollouts(7)
        demos = OffPolicyPG(prompts=[[1, 5, 6]] * 3,
                            completions=[[8, 9, 2, 7, 4, 4, 5, 6]] * 3,
                            advantages=[1.0, 0.5, -1.0])
        pg = PolicyGradient(rollouts=r, advantages=adv)
        apart = group.call(group.fanout("update", [pg, demos], lr=0.0))[0]
        joint = group.call(group.fanout("update", [replace(pg, joint="luffy"),
                                                   replace(demos, joint="luffy")], lr=0.0))[0]
    finally:
        group.shutdown()
    n_on, n_off = apart["rl/tokens"], apart["off/tokens"]
    assert n_off == 24 and n_on > 0
    share = n_on / (n_on + n_off)
    assert joint["rl/loss"] == pytest.approx(apart["rl/loss"] * share, rel=1e-5)
    assert joint["off/loss"] == pytest.approx(apart["off/loss"] * (1 - share), rel=1e-5)
    assert apart["off/entropy"] > 0
