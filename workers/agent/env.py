"""The environment interface: what a multi-turn task gives the agent loop (workers/agent/loop.py).

An environment is a class named by import path in the recipe (``environment.cls``, its
``environment.args`` passed to the constructor), one instance per trajectory, asynchronous and
message-level, gym-shaped:

    obs = await env.reset(record, seed)      # Observation(messages, tools)
    res = await env.step(turn)               # StepResult(messages, reward, terminated, truncated,
                                             #            info)
    await env.close()                        # always called, on every path

``reset`` gets the data record of the prompt and a seed; its ``messages`` open the conversation
(None: the record formatted as the recipe's ``prompt`` section says — the single-turn prompt).
``step`` gets the policy's turn (its text, its tool calls parsed by the recipe's tool parser,
its token ids) and answers with the messages that follow it (tool results, a user's reply; empty
when it ends), a reward for this turn, and whether the episode ended (``terminated``: the task is
done; ``truncated``: the environment cut it short). The trajectory's reward is the sum of its
turns' rewards; ``info["reward_components"]`` (a dict of floats) names its parts for metrics.

An exception from ``reset`` or ``step`` ends the trajectory with status ``env_error``: it is
counted, its reward is None, and it stays out of its group's baseline — never scored 0.

The single-turn verifier tasks are the one-turn case: ``VerifierEnv`` below scores the first turn
with verifiers (``rewards/``) and ends.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolCall:
    """A tool call parsed from a turn. ``error``: why its arguments could not be read (not JSON,
    not an object); the environment answers with it instead of calling the tool."""

    name: str
    arguments: dict[str, Any]
    id: str = ""
    error: str | None = None


@dataclass
class Turn:
    text: str                      # the turn as decoded by the engine
    token_ids: list[int]           # exactly the ids the engine sampled
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "stop"    # stop | length (the turn's token budget ran out)
    index: int = 0                 # 0 for the first turn
    malformed_tool_call: bool = False  # the text opened a tool call the parser could not read
    # prompt.response_prefix, on the first turn of a prompt the recipe formatted (it sits in the
    # prompt, so the sampled text lacks it): what a verifier reads is ``prefix + text``
    prefix: str = ""


@dataclass
class Observation:
    messages: list[dict] | None = None   # None: the record as the prompt section formats it
    tools: list[dict] | None = None      # JSON schemas, given to the chat template's tools=


@dataclass
class StepResult:
    messages: list[dict] = field(default_factory=list)
    reward: float = 0.0
    terminated: bool = False
    truncated: bool = False
    info: dict[str, Any] = field(default_factory=dict)


class Environment:
    """Base class (optional: any class with these three coroutines works)."""

    def __init__(self, **args):
        self.args = args

    async def reset(self, record: dict, seed: int) -> Observation:
        self.record, self.seed = record, seed
        return Observation()

    async def step(self, turn: Turn) -> StepResult:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class VerifierEnv(Environment):
    """The one-turn environment: the record's prompt as the recipe formats it, one turn, scored
    by the verifiers (``rewards/``: ``(prompts, completions, **fields) -> list[float | None]``,
    weighted and summed; a None from any makes the trajectory an ``env_error``)."""

    def __init__(self, verifiers: list[str], weights: list[float] | None = None):
        from core.registry import resolve

        self.verifiers = [resolve(v, "environment.args.verifiers") for v in verifiers]
        self.names = [v.rpartition(":")[2] for v in verifiers]
        self.weights = weights or [1.0] * len(verifiers)

    async def reset(self, record: dict, seed: int) -> Observation:
        self.record = record
        return Observation()

    async def step(self, turn: Turn) -> StepResult:
        rec = self.record
        fields = {k: [v] for k, v in rec.items() if k not in ("prompt", "id", "demonstration")}
        parts = {}
        for fn, name in zip(self.verifiers, self.names):
            got = fn([rec["prompt"]], [turn.prefix + turn.text], **fields)
            got = await got if inspect.isawaitable(got) else got
            if got[0] is None:
                raise ValueError(f"verifier {name} could not score the turn")
            parts[name] = float(got[0])
        reward = sum(w * parts[n] for w, n in zip(self.weights, self.names))
        return StepResult(reward=reward, terminated=True, info={"reward_components": parts})
