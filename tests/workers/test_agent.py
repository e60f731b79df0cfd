"""The agent loop's bookkeeping without an engine: chat-template deltas, budgets, tool calls
and their failures, environment errors, closing on every path. The turns come from a scripted
sampler here (the engine's side is tests/integration/test_agent.py, with real vLLM)."""

import asyncio

import pytest
import torch

from workers.agent.env import Environment, Observation
from workers.agent.loop import AgentLoop, Budgets, Renderer
from workers.agent.tools import ToolEnv, python, tool_schema
from workers.learner import losses
from workers.learner.packing import pack


@pytest.fixture(scope="module")
def tok(tiny_chat_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat_model)


class Script:
    """Answers each turn with the next text of ``turns`` (tokenised), ending it with the end of
    turn unless ``finish`` says length; records what it was asked."""

    def __init__(self, tok, turns, finish="stop"):
        self.tok, self.turns, self.finish, self.asked = tok, list(turns), finish, []

    def enter(self):
        pass

    def leave(self):
        pass

    async def sample(self, ids, sampling):
        self.asked.append((list(ids), dict(sampling)))
        text = self.turns.pop(0)
        out = self.tok(text, add_special_tokens=False).input_ids
        out = out[:sampling["max_tokens"]]
        finish = "length" if len(out) == sampling["max_tokens"] and self.finish == "length" \
            else "stop"
        if finish == "stop":
            out = out + [self.tok.convert_tokens_to_ids("<|im_end|>")]
        return out, [-0.5] * len(out), text, finish, (3, 3)


def run(loop, sampler, record=None, n=1, seeded=True):
    item = {"record": record or {"id": "a", "prompt": "2+2", "answer": "4"}, "seed": 7,
            "prompt_ids": [1, 2, 3]}
    return asyncio.run(loop.run([item], n, {"temperature": 1.0}, sampler, True, 0, 3, seeded))


def test_delta_is_the_new_messages_after_an_assistant_turn(tok):
    r = Renderer(tok)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert r.end_of_turn == end
    a = tok("a", add_special_tokens=False).input_ids
    assert r.close(a + [end]) == tok("\n", add_special_tokens=False).input_ids
    assert r.close(a) == [end] + tok("\n", add_special_tokens=False).input_ids
    want = tok("<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n",
               add_special_tokens=False).input_ids
    assert r.delta([{"role": "tool", "content": "42"}], None) == want


def test_trajectory_is_the_sampled_ids_plus_the_deltas_masked(tok, tiny_chat_model):
    from tests.fixtures.envs import CountingEnv

    r = Renderer(tok)
    loop = AgentLoop(lambda: CountingEnv(turns=3), r, None, Budgets(max_tokens_per_turn=20))
    s = Script(tok, ["ab", "abc", "abcd"])
    out = run(loop, s)
    ids, mask = out.completion_ids[0], out.loss_mask[0]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    sampled = [tok("ab", add_special_tokens=False).input_ids + [end],
               tok("abc", add_special_tokens=False).input_ids + [end],
               tok("abcd", add_special_tokens=False).input_ids + [end]]
    delta = [r.close(sampled[k]) + r.delta([{"role": "user", "content": f"go on {k}"}], None)
             for k in range(2)]
    assert ids == sampled[0] + delta[0] + sampled[1] + delta[1] + sampled[2]
    assert mask == [1] * len(sampled[0]) + [0] * len(delta[0]) + [1] * len(sampled[1]) + \
        [0] * len(delta[1]) + [1] * len(sampled[2])
    assert [ids[a:b] for a, b in out.turns[0]] == sampled
    # every turn is sampled from the ids so far, never a re-rendered conversation
    assert [a for a, _ in s.asked] == [[1, 2, 3], [1, 2, 3] + sampled[0] + delta[0],
                                       [1, 2, 3] + sampled[0] + delta[0] + sampled[1] + delta[1]]
    assert out.logprobs[0] == [-0.5 if m else 0.0 for m in mask]
    assert out.status == ["ok"] and out.env_rewards == [2.0]  # "ab", "abcd": even
    assert out.env_info[0]["reward_components"] == {"even": 2.0}
    # seeds: turn 0 is vLLM's seed for the sample (item seed + sample index), then per turn
    assert [a["seed"] for _, a in s.asked] == [7, 7 + 1_000_003, 7 + 2 * 1_000_003]


def test_budgets_end_a_trajectory_as_truncated(tok):
    from tests.fixtures.envs import CountingEnv

    def traj(budgets, turns=("ab",) * 5, finish="stop", env_turns=5):
        loop = AgentLoop(lambda: CountingEnv(turns=env_turns), Renderer(tok), None, budgets)
        return run(loop, Script(tok, turns, finish))

    out = traj(Budgets(max_turns=2, max_tokens_per_turn=20))
    assert out.status == ["truncated"] and out.env_info[0]["truncated_by"] == "max_turns"
    assert len(out.turns[0]) == 2
    out = traj(Budgets(max_tokens_per_turn=3), turns=["abcdefgh"], finish="length")
    assert out.env_info[0]["truncated_by"] == "tokens" and len(out.completion_ids[0]) == 3
    out = traj(Budgets(max_tokens_per_turn=20, max_total_tokens=25))
    assert out.env_info[0]["truncated_by"] == "tokens"
    assert len(out.completion_ids[0]) <= 25
    # what the engine's context leaves: prompt (3) + completion within max_model_len
    out = traj(Budgets(max_tokens_per_turn=20, max_model_len=30))
    assert 3 + len(out.completion_ids[0]) <= 30 and out.status == ["truncated"]


def test_long_environment_messages_are_cut_and_say_so(tok):
    from tests.fixtures.envs import CountingEnv

    loop = AgentLoop(lambda: CountingEnv(turns=2, reply="x" * 300), Renderer(tok), None,
                     Budgets(max_tokens_per_turn=20, max_env_tokens=10))
    out = run(loop, Script(tok, ["ab", "ab"]))
    text = tok.decode(out.completion_ids[0])
    assert "x" * 10 + "\n[truncated: 290 more tokens]" in text and "x" * 11 not in text
    assert out.env_info[0]["env_outputs_truncated"] == 1.0


class Broken(Environment):
    closed = []

    def __init__(self, where: str):
        self.where = where

    async def reset(self, record, seed):
        if self.where == "reset":
            raise ValueError("no such task")
        return Observation()

    async def step(self, turn):
        if self.where == "hang":
            await asyncio.sleep(60)
        raise KeyError("board")

    async def close(self):
        Broken.closed.append(self.where)


@pytest.mark.parametrize("where", ["reset", "step", "hang"])
def test_an_environment_that_fails_or_hangs_ends_its_trajectory_and_is_closed(tok, where):
    Broken.closed.clear()
    loop = AgentLoop(lambda: Broken(where), Renderer(tok), None,
                     Budgets(max_tokens_per_turn=20, wall_s=1.0 if where == "hang" else None))
    out = run(loop, Script(tok, ["ab"]))
    if where == "hang":
        assert out.status == ["truncated"] and out.env_info[0]["truncated_by"] == "wall_s"
        assert out.env_rewards == [0.0]
    else:
        assert out.status == ["env_error"] and out.env_rewards == [None]
        assert out.env_info[0]["error"].startswith(("ValueError: no such task", "KeyError"))
    assert Broken.closed == [where]


def flaky(x: int) -> str:
    """A tool that fails on odd numbers, hangs on 0, floods on 2.

    Args:
        x: a number
    """
    import time

    if x == 0:
        time.sleep(5)
    if x == 2:
        return "y" * 5000
    if x % 2:
        raise ArithmeticError(f"odd: {x}")
    return str(x * 10)


def answer(prompts, completions, answer, **_):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


def test_tools_that_raise_hang_flood_or_get_bad_arguments_answer_with_errors(tok):
    from workers.agent.loop import tool_parser

    calls = ['<tool_call>{"name": "flaky", "arguments": {"x": 4}}</tool_call>',
             '<tool_call>{"name": "flaky", "arguments": {"x": 3}}</tool_call>'
             '<tool_call>{"name": "flaky", "arguments": {"x": 0}}</tool_call>',
             '<tool_call>{"name": "flaky", "arguments": {"y": 1}}</tool_call>'
             '<tool_call>{"name": "nope", "arguments": {}}</tool_call>',
             '<tool_call>{"name": "flaky", "arguments": {"x": 2}}</tool_call>',
             '<tool_call>{"name": "flaky", "arguments": </tool_call>',
             "4"]
    env = ToolEnv(tools=["tests.workers.test_agent:flaky"],
                  verifier="tests.workers.test_agent:answer", timeout_s=1.0)
    loop = AgentLoop(lambda: env, Renderer(tok), tool_parser("hermes", tok),
                     Budgets(max_turns=8, max_tokens_per_turn=200, max_env_tokens=100,
                             max_model_len=4096))
    out = run(loop, Script(tok, calls))
    info = out.env_info[0]
    assert out.status == ["ok"] and out.env_rewards == [1.0]
    assert info["tool_calls"] == 6 and info["malformed_tool_calls"] == 1
    assert info["tool_errors"] == 1 and info["tool_timeouts"] == 1
    assert info["invalid_tool_calls"] == 2 and info["env_outputs_truncated"] == 1
    text = tok.decode(out.completion_ids[0])
    for said in ("40", "error: ArithmeticError: odd: 3", "error: no result within 1s",
                 "error: missing a required argument: 'x'", "error: no tool named 'nope'",
                 "[truncated: 4900 more tokens]", "the tool call could not be parsed"):
        assert said in text, said


def test_the_python_tool_runs_in_the_sandbox():
    assert python("print(6 * 7)") == "42\n"
    assert "[forbidden]" in python("import os; os.system('true')")
    assert tool_schema(python)["function"]["parameters"]["required"] == ["code"]


def test_masked_tokens_change_neither_loss_nor_gradient():
    from types import SimpleNamespace

    algo = SimpleNamespace(clip=0.2, clip_high=None, dual_clip=None, log_ratio_clamp=None,
                           tis_cap=None, kl=0.1, kl_clamp=None, policy_loss="ppo_clip")
    mask = [1, 1, 0, 0, 1]

    def loss_and_grad(masked_value: float):
        other = [masked_value if not m else 0.0 for m in mask]
        b = pack([[1, 2]], [[3, 4, 5, 6, 7]], 0, advantages=[[0.5, -1, 9 + masked_value,
                                                               -9, 0.25]],
                  old_logprobs=[[-1.0, -0.5] + [-3 + v for v in other[2:4]] + [-2.0]],
                  ref_logprobs=[[-1.2, -0.4, other[2], 5.0, -1.5]], masks=[mask])
        logp = torch.tensor([-1.1, -0.6, -2.0 - masked_value, -0.1, -1.9], requires_grad=True)
        per_token, _ = losses.policy_gradient_loss(losses.ppo_clip_loss, logp, b, algo)
        total = losses.aggregate(per_token, b, "seq_mean_token_mean", 3.0, 1.0)
        total.backward()
        return float(total), logp.grad.tolist(), b

    a, ga, b = loss_and_grad(0.0)
    c, gc, _ = loss_and_grad(4.0)
    assert a == pytest.approx(c) and ga == pytest.approx(gc)
    assert ga[2] == 0 and ga[3] == 0 and ga[0] != 0
    assert b.n_tokens == 3 and b.seq_len.tolist() == [3.0] * 5


def test_a_multi_turn_demonstration_trains_on_the_assistants_tokens_only(tok):
    from types import SimpleNamespace

    from orchestrator.prompts import PromptFormatter, answer_text

    cfg = SimpleNamespace(chat_template=None, style="chat", system=None, template="{prompt}",
                          template_kwargs={}, add_generation_prompt=True, response_prefix="",
                          tools=[])
    f = PromptFormatter(tok, cfg)
    call = '<tool_call>{"name": "python", "arguments": {"code": "print(6*7)"}}</tool_call>'
    rec = {"id": "d", "prompt": "6*7?", "demonstration": [
        {"role": "assistant", "content": call}, {"role": "tool", "content": "42"},
        {"role": "assistant", "content": "42"}]}
    ids, mask = f.demonstration(rec)
    prompt = f.prompt_ids(rec)
    whole = tok.apply_chat_template([{"role": "user", "content": "6*7?"}] + rec["demonstration"],
                                    tokenize=False)
    assert tok.decode(prompt + ids) == whole
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    assert trained == f"{call}<|im_end|>42<|im_end|>"
    assert f.demonstration(rec | {"demonstration": "42"}) == (f.completion_ids("42"), None)
    assert answer_text(rec) == "42"
    with pytest.raises(ValueError, match="must end with an assistant message"):
        f.demonstration(rec | {"demonstration": rec["demonstration"][:2]})


def test_mini_batches_cut_the_loss_masks_with_their_rows():
    from workers.learner.schedule import mini_batches
    from workers.learner.terms import SFT

    term = SFT(prompts=[[1]] * 4, completions=[[1, 2], [3], [4, 5, 6], [7]],
               masks=[[1, 0], None, [0, 1, 1], [1]])
    for (part,) in mini_batches([term], 2, 1, (0, 0)):
        assert len(part.masks) == len(part.prompts) == 2
        for c, m in zip(part.completions, part.masks):
            assert m is None or len(m) == len(c)


def test_a_mask_of_ones_packs_as_no_mask():
    a = pack([[1, 2], [3]], [[4, 5, 6], [7]], 0, advantages=[0.5, -1.0])
    b = pack([[1, 2], [3]], [[4, 5, 6], [7]], 0, advantages=[0.5, -1.0],
             masks=[[1, 1, 1], [1]])
    for name in ("input_ids", "position_ids", "positions", "targets", "weight", "advantages",
                 "seq_len", "row"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_validate_names_a_multi_turn_demonstration_the_template_cannot_train_on(tok):
    from types import SimpleNamespace

    from core.errors import RecipeError
    from orchestrator.prompts import PromptFormatter
    from orchestrator.setup import check_prompts

    cfg = SimpleNamespace(chat_template=None, style="chat", system=None, template="{prompt}",
                          template_kwargs={}, add_generation_prompt=True, response_prefix="",
                          tools=[])
    f = PromptFormatter(tok, cfg)
    rec = {"id": "d7", "prompt": "6*7?", "demonstration": [
        {"role": "assistant", "content": "x"}, {"role": "tool", "content": "42"}]}
    with pytest.raises(RecipeError, match="data.train: record 'd7': a demonstration that is a "
                                          "list of messages must end with an assistant"):
        check_prompts(f, {"data.train": [rec]})


STRIPPING = ("{% for m in messages %}{% set c = m['content'] %}"
             "{% if m['role'] == 'assistant' and not loop.last %}"
             "{% set c = c.split('</think>')[-1] %}{% endif %}"
             "<|im_start|>{{ m['role'] }}\n{{ c }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_strip_samples_each_turn_from_the_rerendered_conversation_and_trains_each(tok):
    """thinking_history strip: a template that drops earlier <think> blocks is applied to the
    whole conversation at each turn; each turn is trained as a sample of its own — exactly its
    prompt's ids and its sampled ids — with the trajectory's advantage."""
    import copy

    from tests.fixtures.envs import CountingEnv
    from workers.learner.terms import PolicyGradient

    stok = copy.deepcopy(tok)
    stok.chat_template = STRIPPING
    r = Renderer(stok)
    loop = AgentLoop(lambda: CountingEnv(turns=3), r, None, Budgets(max_tokens_per_turn=40),
                     strip=True)
    texts = ["<think>xx</think>ab", "<think>yy</think>abc", "abcd"]
    s = Script(stok, texts)
    msgs = [{"role": "user", "content": "2+2"}]
    item = {"record": {"id": "a", "prompt": "2+2"}, "seed": 7, "prompt_ids": r.prompt(msgs, None),
            "messages": msgs}
    out = asyncio.run(loop.run([item], 1, {"temperature": 1.0}, s, True, 0, 3))
    asked = [ids for ids, _ in s.asked]
    convo = msgs + [{"role": "assistant", "content": texts[0]},
                    {"role": "user", "content": "go on 0"}]
    assert asked[0] == item["prompt_ids"] and asked[1] == r.prompt(convo, None)
    assert asked[2] == r.prompt(convo + [{"role": "assistant", "content": texts[1]},
                                         {"role": "user", "content": "go on 1"}], None)
    later = stok.decode(asked[2])
    assert "xx" not in later and "yy" not in later and "ab" in later  # thinking stripped
    end = stok.convert_tokens_to_ids("<|im_end|>")
    sampled = [stok(t, add_special_tokens=False).input_ids + [end] for t in texts]
    seen = asked[0] + sampled[0]  # what the engine saw and sampled is not the next prompt's start
    assert asked[1][:len(seen)] != seen
    assert out.completion_ids[0] == sum(sampled, []) and out.loss_mask[0] == \
        [1] * len(out.completion_ids[0])
    assert out.turn_prompts[0] == asked
    rows = PolicyGradient(rollouts=out, advantages=[0.75],
                          ref=None).rows()  # one sequence per turn
    assert rows.prompts == asked and rows.completions == sampled
    assert rows.inputs["advantages"] == [0.75] * 3
    assert rows.inputs["old_logprobs"] == [[-0.5] * len(x) for x in sampled]
    assert rows.masks == [[1] * len(x) for x in sampled]
    # the reference's and the learner's sequences are the same: Rollouts.segments
    assert [(p, out.completion_ids[0][a:b]) for p, a, b in out.segments(0)] == \
        list(zip(asked, sampled))


def test_strip_counts_sampled_tokens_against_the_total_budget(tok):
    from tests.fixtures.envs import CountingEnv

    r = Renderer(tok)
    loop = AgentLoop(lambda: CountingEnv(turns=5), r, None,
                     Budgets(max_tokens_per_turn=20, max_total_tokens=8), strip=True)
    msgs = [{"role": "user", "content": "2+2"}]
    item = {"record": {"id": "a", "prompt": "2+2"}, "seed": 7, "prompt_ids": r.prompt(msgs, None),
            "messages": msgs}
    out = asyncio.run(loop.run([item], 1, {"temperature": 1.0}, Script(tok, ["abc"] * 5),
                               True, 0, 3))
    assert out.status == ["truncated"] and out.env_info[0]["truncated_by"] == "tokens"
    assert len(out.completion_ids[0]) <= 8 and len(out.turn_prompts[0]) == len(out.turns[0])


def test_a_one_turn_environment_reads_the_response_prefix_back(tok):
    """prompt.response_prefix sits in the prompt the recipe formats, so the sampled text lacks
    it: the first turn's verifier reads prefix + text, as the reward worker does for
    single-turn samples (a one-turn environment scores what they score)."""
    from workers.agent.env import VerifierEnv

    def reward(prefix):
        loop = AgentLoop(lambda: VerifierEnv(["rewards.format:think_answer_format"]),
                         Renderer(tok), None, Budgets(max_tokens_per_turn=60),
                         response_prefix=prefix)
        return run(loop, Script(tok, ["a</think><answer>4</answer>"])).env_rewards

    assert reward("<think>") == [1.0] and reward("") == [0.0]
