"""The agent loop: multi-turn trajectories with an environment, inside the rollout worker.

Token in, token out. A trajectory's ids are the prompt, then for each turn exactly the ids the
engine sampled, then the environment's answer rendered by the chat template as a *delta* and
appended; nothing already sampled is ever re-tokenised or re-templated. The delta is the text the
template writes for the new messages after a conversation that ends with an assistant turn,
tokenised on its own (it starts at a template boundary, a special token), plus the template's
tokens that close an assistant turn the engine did not sample (the newline after ``<|im_end|>``,
or the whole end of turn when a turn stopped on a string). Sampled tokens have loss mask 1 and
the engine's log-probs; delta tokens mask 0 and no behaviour log-prob. Earlier turns, thinking
included, stay as sampled (a template that strips old ``<think>`` blocks is not re-applied).

``thinking_history: strip`` instead samples each turn from the conversation so far rendered by
the chat template (earlier turns as text: a template that drops old ``<think>`` blocks drops
them), and keeps each turn's prompt: the learner trains every turn as a sample of its own —
those exact prompt ids, those exact sampled ids — with the trajectory's advantage. Prompts of
later turns are then not prefixes of each other, and no prefix is shared in the engine's cache.

Budgets (the recipe's ``environment`` section) end a trajectory with status ``truncated``:
``max_turns``, ``max_tokens_per_turn`` (a turn cut by it ends the trajectory), ``max_total_tokens``
(everything after the prompt, the environment's tokens included) and the engine's
``max_model_len``, ``wall_s`` per trajectory; ``max_env_tokens`` cuts each environment message
to that many tokens, saying so in the message. An environment that raises (or overruns
``wall_s`` in ``step``) ends it with status ``env_error`` and reward None. The environment is
closed on every path.

Engines: vLLM's ``AsyncLLM`` runs every trajectory's turns as they come (``AsyncSampler``);
vLLM's ``LLM`` runs one ``generate`` at a time, so ``RoundSampler`` gathers the next turns of all
trajectories still running into one call per round — the same rounds whatever the tools' timing,
so runs repeat sample for sample.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from dataclasses import dataclass, field

from workers.agent.env import ToolCall, Turn
from workers.types import Rollouts

MARK = "\u2603braid\u2603"


class Renderer:
    """The chat template of one tokenizer, as prompts and as deltas between turns."""

    def __init__(self, tokenizer, template_kwargs: dict | None = None,
                 end_of_turn: int | None = None):
        self.tok, self.kwargs = tokenizer, dict(template_kwargs or {})
        base = self._text([{"role": "user", "content": "q"},
                           {"role": "assistant", "content": MARK}], None, False)
        # what the template writes after an assistant's content: end of turn and separator
        self.closer = self.tok(base.rpartition(MARK)[2], add_special_tokens=False).input_ids
        self.end_of_turn = end_of_turn if end_of_turn is not None else (
            self.closer[0] if self.closer else tokenizer.eos_token_id)

    def _text(self, messages, tools, generation: bool) -> str:
        return self.tok.apply_chat_template(messages, tools=tools, tokenize=False,
                                            add_generation_prompt=generation, **self.kwargs)

    def prompt(self, messages: list[dict], tools: list[dict] | None) -> list[int]:
        return self.tok(self._text(messages, tools, True), add_special_tokens=False).input_ids

    def close(self, sampled: list[int]) -> list[int]:
        """The template's tokens that end an assistant turn, after what the engine sampled."""
        if sampled and sampled[-1] == self.end_of_turn and self.closer[:1] == [self.end_of_turn]:
            return self.closer[1:]
        return list(self.closer)

    def delta(self, messages: list[dict], tools: list[dict] | None) -> list[int]:
        """The new messages as the template writes them after an assistant turn, up to the next
        assistant turn's opening (the generation prompt)."""
        base = [{"role": "user", "content": "q"}, {"role": "assistant", "content": MARK}]
        head = self._text(base, tools, False)
        full = self._text(base + messages, tools, True)
        if not full.startswith(head):
            raise ValueError("the chat template renders a conversation differently once more "
                             "messages follow: its deltas cannot be appended to sampled turns")
        return self.tok(full[len(head):], add_special_tokens=False).input_ids


@dataclass
class Budgets:
    max_turns: int = 8
    max_tokens_per_turn: int = 256
    max_total_tokens: int | None = None
    max_env_tokens: int | None = None
    wall_s: float | None = None
    max_model_len: int = 4096


@dataclass
class Trajectory:
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)          # after the prompt
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turns: list[tuple[int, int]] = field(default_factory=list)
    prompts: list[list[int]] = field(default_factory=list)  # strip: each turn's prompt
    messages: list[dict] = field(default_factory=list)  # the turns as chat messages
    rewards: list[float] = field(default_factory=list)
    status: str = "ok"
    text: str = ""
    finish_reason: str = "stop"
    versions: tuple[int, int] | None = None
    info: dict = field(default_factory=dict)
    unlogged: bool = False  # a turn came without behaviour log-probs: the row has none

    def sampled(self, ids, logprobs, version: tuple[int, int]) -> None:
        self.turns.append((len(self.ids), len(self.ids) + len(ids)))
        self.ids += ids
        self.mask += [1] * len(ids)
        self.logprobs += logprobs or [0.0] * len(ids)
        self.unlogged = self.unlogged or not logprobs
        v = self.versions
        self.versions = version if v is None else (min(v[0], version[0]), max(v[1], version[1]))

    def appended(self, ids: list[int]) -> None:
        self.ids += ids
        self.mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)

    def count(self, key: str, n: float = 1.0) -> None:
        self.info[key] = self.info.get(key, 0.0) + n


def tool_parser(name: str | None, tokenizer):
    """vLLM's tool-call parser ``name`` (``vllm/tool_parsers``: hermes, llama3_json, ...) for
    this tokenizer, or None. Its own error log is quieted: a malformed call is counted."""
    if not name:
        return None
    from vllm.tool_parsers import ToolParserManager

    cls = ToolParserManager.get_tool_parser(name)
    logging.getLogger(cls.__module__).setLevel(logging.CRITICAL)
    return cls(tokenizer)


def parse_tool_calls(parser, text: str) -> tuple[list[ToolCall], bool]:
    """The turn's tool calls, and whether it opened one the parser could not read."""
    if parser is None:
        return [], False
    got = parser.extract_tool_calls(text, None)
    start = getattr(parser, "tool_call_start_token", None)
    if not got.tools_called:
        return [], bool(start and start in text)
    calls = []
    for i, tc in enumerate(got.tool_calls):
        try:
            args = json.loads(tc.function.arguments or "{}")
            error = None if isinstance(args, dict) else "arguments are not a JSON object"
        except json.JSONDecodeError as err:
            args, error = {}, f"arguments are not JSON: {err}"
        calls.append(ToolCall(tc.function.name, args if isinstance(args, dict) else {},
                              tc.id or f"call_{i}", error))
    return calls, False


class AgentLoop:
    """Runs the trajectories of one ``generate`` call: ``n`` per item, all at once."""

    def __init__(self, env_factory, renderer: Renderer, parser, budgets: Budgets,
                 strip: bool = False, keep_messages: bool = False, response_prefix: str = ""):
        self.env_factory, self.renderer, self.parser = env_factory, renderer, parser
        self.budgets, self.strip = budgets, strip
        # a teacher's trajectories become demonstrations: their turns as chat messages too
        self.keep_messages = keep_messages
        self.response_prefix = response_prefix  # in the prompts the recipe formats

    async def run(self, items: list[dict], n: int, sampling: dict, sampler, want: bool,
                  index_offset: int, version: int, seeded: bool = True) -> Rollouts:
        """``n`` trajectories for each ``{"record", "seed", "prompt_ids"}`` item. ``seeded``:
        every turn sampled with a seed of its own (from the item's, the sample's and the
        turn's index), so a trajectory repeats on another engine or after a resume."""
        self.seeded = seeded
        jobs = [(i, j, it) for i, it in enumerate(items) for j in range(n)]
        for _ in jobs:  # all counted before any runs: a round waits for every one
            sampler.enter()
        trajs = await asyncio.gather(*(self.trajectory(it, j, sampling, sampler, want)
                                       for _, j, it in jobs))
        r = Rollouts([], [], [], [], [], [], version)
        for (i, _, _), t in zip(jobs, trajs):
            r.prompt_index.append(index_offset + i)
            r.prompt_ids.append(t.prompt_ids)
            r.completion_ids.append(t.ids)
            r.logprobs.append(t.logprobs if want and not t.unlogged else [])
            r.texts.append(t.text)
            r.finish_reasons.append(t.finish_reason)
            r.versions.append(t.versions or (version, version))
            r.loss_mask.append(t.mask)
            r.turns.append(t.turns)
            r.turn_prompts.append(t.prompts)
            r.status.append(t.status)
            r.env_rewards.append(None if t.status == "env_error" else sum(t.rewards))
            r.env_info.append(t.info | {"turns": float(len(t.turns))} |
                              ({"messages": t.messages} if self.keep_messages else {}))
        if r.versions:
            r.weight_version = min(first for first, _ in r.versions)
        return r

    async def trajectory(self, item: dict, j: int, sampling: dict, sampler,
                         want: bool) -> Trajectory:
        """One trajectory. The environment's failures end it as ``env_error``; the engine's
        propagate (the call fails, the controller replaces the engine and asks again)."""
        b = self.budgets
        deadline = time.monotonic() + b.wall_s if b.wall_s else None
        t = Trajectory(prompt_ids=list(item.get("prompt_ids") or []))
        env = None
        try:
            env = await self._env(self._make_env(), None)
            obs = await self._env(env.reset(item["record"], item["seed"] + j), deadline)
            tools, messages = obs.tools, obs.messages
            if messages is not None:
                t.prompt_ids = self.renderer.prompt(messages, tools)
            elif self.strip:  # the prompt as the recipe formatted it, re-rendered each turn
                messages, tools = item.get("messages"), item.get("tools")
                if not messages:
                    raise ValueError("thinking_history strip: the item has no messages")
            messages = list(messages or [])
            prompt = t.prompt_ids
            for k in range(b.max_turns):
                room = self._room(t, prompt)
                if room < 1:
                    return self._truncated(t, "tokens")
                if deadline is not None and time.monotonic() >= deadline:
                    return self._truncated(t, "wall_s")
                # turn 0 takes the seed vLLM gives sample j of an n-sample request
                seed = item["seed"] + j + 1_000_003 * k if self.seeded else None
                ids, lps, text, finish, span = await sampler.sample(
                    prompt, sampling | {"max_tokens": room, "seed": seed})
                t.sampled(ids, lps if want else [], span)
                t.messages.append({"role": "assistant", "content": text})
                if self.strip:
                    t.prompts.append(prompt)
                t.text, t.finish_reason = text, finish
                calls, malformed = parse_tool_calls(self.parser, text)
                t.count("tool_calls", len(calls))
                t.count("malformed_tool_calls", float(malformed))
                prefix = self.response_prefix if k == 0 and obs.messages is None else ""
                res = await self._env(env.step(Turn(text, ids, calls, finish, k, malformed,
                                                    prefix)), deadline)
                t.rewards.append(float(res.reward))
                self._info(t, res.info)
                if res.terminated:
                    return t
                if res.truncated:
                    return self._truncated(t, "environment")
                if finish == "length":
                    return self._truncated(t, "tokens")
                if k + 1 == b.max_turns:
                    break
                said = self._messages(t, res.messages)
                t.messages += said
                if self.strip:
                    messages += [{"role": "assistant", "content": text}] + said
                    prompt = self._render(messages, tools)
                    continue
                delta = self.renderer.close(ids) + self._delta(said, tools)
                if len(t.ids) + len(delta) >= self._limit(t):  # no room left for a turn
                    return self._truncated(t, "tokens")
                t.appended(delta)
                prompt = t.prompt_ids + t.ids
            return self._truncated(t, "max_turns")
        except _WallClock:
            return self._truncated(t, "wall_s")
        except _EnvFailed as failed:  # the environment's: counted, never the run's
            err = failed.__cause__
            t.status = "env_error"
            t.info["error"] = f"{type(err).__name__}: {err}"[:500]
            return t
        finally:
            sampler.leave()
            if env is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(env.close(), 30)

    async def _make_env(self):
        return self.env_factory()

    def _room(self, t: Trajectory, prompt: list[int]) -> int:
        """Tokens the next turn may sample from ``prompt``."""
        b = self.budgets
        if not self.strip:
            return min(b.max_tokens_per_turn, self._limit(t) - len(t.ids))
        room = min(b.max_tokens_per_turn, b.max_model_len - len(prompt))
        return room if b.max_total_tokens is None else min(room, b.max_total_tokens - len(t.ids))

    def _limit(self, t: Trajectory) -> int:
        """Tokens the trajectory may hold after its prompt."""
        b = self.budgets
        limit = b.max_model_len - len(t.prompt_ids)
        return limit if b.max_total_tokens is None else min(limit, b.max_total_tokens)

    @staticmethod
    async def _env(coro, deadline):
        """An environment call: past the trajectory's ``deadline`` it is cancelled
        (``_WallClock``); an exception of its own (its own timeouts too) is ``_EnvFailed``."""
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        cm = asyncio.timeout(left)
        try:
            async with cm:
                return await coro
        except TimeoutError as err:
            if cm.expired():
                raise _WallClock from None
            raise _EnvFailed() from err
        except Exception as err:
            raise _EnvFailed() from err

    def _messages(self, t: Trajectory, messages: list[dict]) -> list[dict]:
        """The environment's messages, each cut to ``max_env_tokens``."""
        cap = self.budgets.max_env_tokens
        return [self._cut(t, m, cap) for m in messages] if cap else list(messages)

    def _delta(self, messages: list[dict], tools) -> list[int]:
        """The environment's messages as the template renders them (none: the next assistant
        turn's header alone)."""
        try:
            return self.renderer.delta(messages, tools)
        except Exception as err:  # a message the template cannot render: the environment's
            raise _EnvFailed() from err

    def _render(self, messages: list[dict], tools) -> list[int]:
        """The conversation so far as the next turn's prompt (``thinking_history: strip``)."""
        try:
            return self.renderer.prompt(messages, tools)
        except Exception as err:  # a message the template cannot render: the environment's
            raise _EnvFailed() from err

    def _cut(self, t: Trajectory, message: dict, cap: int) -> dict:
        content = message.get("content")
        if not isinstance(content, str):
            return message
        ids = self.renderer.tok(content, add_special_tokens=False).input_ids
        if len(ids) <= cap:
            return message
        t.count("env_outputs_truncated")
        kept = self.renderer.tok.decode(ids[:cap])
        return message | {"content": f"{kept}\n[truncated: {len(ids) - cap} more tokens]"}

    @staticmethod
    def _info(t: Trajectory, info: dict) -> None:
        for k, v in (info or {}).items():
            if k == "reward_components":
                comps = t.info.setdefault("reward_components", {})
                for name, x in v.items():
                    comps[name] = comps.get(name, 0.0) + float(x)
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                t.count(k, float(v))

    @staticmethod
    def _truncated(t: Trajectory, why: str) -> Trajectory:
        t.status = "truncated"
        t.info["truncated_by"] = why
        return t


class _WallClock(Exception):
    pass


class _EnvFailed(Exception):
    """The environment (its constructor, reset, step or rendering its messages) failed."""


def turn_output(out, want: bool, version: int, exact: bool = False):
    """(ids, log-probs, text, finish reason, (first, last) weight version) of a vLLM request
    output's one sample (``exact``: every token came from ``version`` — a LoRA adapter's, which
    a request keeps from start to end — whatever the engine's labels say)."""
    c = out.outputs[0]
    ids = list(c.token_ids)
    lps = [lp[tok].logprob for tok, lp in zip(ids, c.logprobs or [])] if want else []
    spans = [] if exact else [int(sp.version) if sp.version.isdigit() else version
                              for sp in getattr(c, "weight_versions", None) or []]
    return ids, lps, c.text, str(c.finish_reason), ((spans[0], spans[-1]) if spans
                                                    else (version, version))


def params(sampling: dict, want: bool):
    from vllm import SamplingParams

    return SamplingParams(n=1, logprobs=0 if want else None, **sampling)


class RoundSampler:
    """For vLLM's ``LLM``: once every trajectory still running waits for its next turn, one
    ``generate`` call for all of them (rounds fixed by the trajectories, not by timing)."""

    def __init__(self, llm, want: bool, version: int, lora=None):
        self.llm, self.want, self.version, self.lora = llm, want, version, lora
        self.pending: list = []
        self.running = 0

    def enter(self) -> None:
        self.running += 1

    def leave(self) -> None:
        self.running -= 1
        self._flush()

    async def sample(self, ids: list[int], sampling: dict):
        fut = asyncio.get_running_loop().create_future()
        self.pending.append(({"prompt_token_ids": ids}, params(sampling, self.want), fut))
        self._flush()
        return await fut

    def _flush(self) -> None:
        if not self.pending or len(self.pending) < self.running:
            return
        batch, self.pending = self.pending, []
        waiting = [fut for *_, fut in batch]
        try:
            outs = self.llm.generate([b[0] for b in batch], [b[1] for b in batch],
                                     use_tqdm=False, lora_request=self.lora)
            if len(outs) != len(batch):
                raise RuntimeError(f"vLLM answered {len(outs)} of {len(batch)} requests")
            for fut, out in zip(waiting, outs):
                if not fut.done():
                    fut.set_result(turn_output(out, self.want, self.version))
        except Exception as err:  # every trajectory still waiting hears of it
            for fut in waiting:
                if not fut.done():
                    fut.set_exception(err)


class AsyncSampler:
    """For vLLM's ``AsyncLLM``: each turn a request of its own, as it comes — under the newest
    weights (``adapter_of``: the newest LoRA adapter's (version, request), when the engine
    samples from adapters)."""

    _ids = itertools.count()

    def __init__(self, llm, want: bool, version_of, adapter_of=None):
        self.llm, self.want, self.version_of, self.adapter_of = llm, want, version_of, adapter_of

    def enter(self) -> None:
        pass

    def leave(self) -> None:
        pass

    async def sample(self, ids: list[int], sampling: dict):
        from vllm.sampling_params import RequestOutputKind

        p = params(sampling, self.want)
        p.output_kind = RequestOutputKind.FINAL_ONLY
        rid = f"agent-{next(self._ids)}"
        adapter = self.adapter_of() if self.adapter_of is not None else None
        out = None
        try:
            async for out in self.llm.generate({"prompt_token_ids": ids}, p,  # noqa: B007
                                               request_id=rid,
                                               lora_request=adapter and adapter[1]):
                pass
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await self.llm.abort([rid])
            raise
        if adapter is not None:
            return turn_output(out, self.want, adapter[0], exact=True)
        return turn_output(out, self.want, self.version_of())


def agent_loop(recipe, max_model_len: int, model_path: str,
               keep_messages: bool = False) -> AgentLoop:
    """The agent loop of a recipe with an ``environment`` section, for an engine serving
    ``model_path`` (its tokenizer and chat template render the environment's turns);
    ``keep_messages``: each trajectory's turns as chat messages in its ``env_info`` (a
    teacher's: demonstrations)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from core.registry import resolve

    cfg, prompt = recipe.environment, recipe.prompt
    tok = AutoTokenizer.from_pretrained(model_path)
    if prompt.chat_template:
        tok.chat_template = Path(prompt.chat_template).expanduser().read_text()
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"environment: the tokenizer of {model_path} has no chat template to "
                         "render the environment's turns with (set prompt.chat_template)")
    env_cls = resolve(cfg.cls, "environment.cls")
    budgets = Budgets(max_turns=cfg.max_turns,
                      max_tokens_per_turn=cfg.max_tokens_per_turn or recipe.sampling.max_tokens,
                      max_total_tokens=cfg.max_total_tokens, max_env_tokens=cfg.max_env_tokens,
                      wall_s=cfg.wall_s, max_model_len=max_model_len)
    return AgentLoop(lambda: env_cls(**cfg.args), Renderer(tok, prompt.template_kwargs),
                     tool_parser(cfg.tool_parser, tok), budgets,
                     strip=cfg.thinking_history == "strip", keep_messages=keep_messages,
                     response_prefix=prompt.response_prefix)
