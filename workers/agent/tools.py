"""Function tools and the environment that runs them.

A tool is a plain Python function named by import path; its JSON schema comes from its
signature and Google-style docstring (transformers' ``get_json_schema``, the schema chat templates
take as ``tools=``). ``python`` runs a program in braid's sandbox (``rewards/sandbox.py``: a fresh
interpreter under CPU, memory, output and wall limits, no network, no process creation).

``ToolEnv`` is the environment of a question answered with tools: the record's prompt as the user
message (after ``system``, with the tools offered — or, without ``system``, the prompt as the
recipe's ``prompt`` section formats it, ``prompt.tools`` naming the tools for the template);
each turn's tool calls run — at
most ``max_parallel_calls`` of them, each under ``timeout_s`` — and their results come back as
``tool`` messages; a turn without a tool call is the final answer, scored by ``verifier``
(``(prompts, completions, **fields)``, ``rewards/``) and the trajectory ends. A call to an unknown
tool, with arguments that are not JSON or do not fit the signature, one that raises, or one past
its timeout gets an error message back instead of a result (the model may try again), and is
counted: ``tool_errors``, ``tool_timeouts``, ``invalid_tool_calls`` (and by the loop,
``malformed_tool_calls``: a turn that opened a call the parser could not read).
"""

from __future__ import annotations

import asyncio
import inspect

from workers.agent.env import Environment, Observation, StepResult, Turn


def python(code: str) -> str:
    """Run a Python program and return what it prints.

    Args:
        code: the program's source; print the values you need
    """
    from rewards.sandbox import run_code

    r = run_code(code, cpu_s=2, wall_s=5, output_bytes=16_000)
    if r.status == "ok":
        return r.stdout
    return f"{r.stdout}[{r.status}]\n{r.stderr[-1000:]}"


async def in_thread(fn, kwargs: dict, timeout_s: float):
    """``fn(**kwargs)`` in a thread of its own, awaited at most ``timeout_s`` from when it starts
    (TimeoutError). A call past it is abandoned in its thread — not waited for, by this
    trajectory or by the event loop's shutdown (the sandboxed python tool kills its own program
    at its wall limit; a plain Python function cannot be killed)."""
    import concurrent.futures

    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="braid-tool")
    try:
        return await asyncio.wait_for(
            asyncio.wrap_future(pool.submit(lambda: fn(**kwargs))), timeout_s)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def tool_schema(fn) -> dict:
    """The JSON schema of a function tool (its signature and Google-style docstring)."""
    from transformers.utils import get_json_schema

    try:
        schema = get_json_schema(fn)
    except Exception as err:  # no docstring, an argument without a type hint or description
        raise ValueError(f"tool {getattr(fn, '__name__', fn)!r}: {err} — a tool needs type "
                         "hints and a Google-style docstring with an Args: section") from None
    schema["function"].pop("return", None)
    return schema


class ToolEnv(Environment):
    def __init__(self, tools: list[str], verifier: str, system: str | None = None,
                 max_parallel_calls: int = 4, timeout_s: float = 10.0):
        from core.registry import resolve

        self.tools = {}
        for path in tools:
            fn = resolve(path, "environment.args.tools")
            self.tools[fn.__name__] = fn
        self.schemas = [tool_schema(fn) for fn in self.tools.values()]
        self.verifier = resolve(verifier, "environment.args.verifier")
        self.system, self.max_parallel, self.timeout_s = system, max_parallel_calls, timeout_s

    async def reset(self, record: dict, seed: int) -> Observation:
        """The record's prompt after ``system`` with the tools offered; without ``system``, the
        prompt as the recipe formats it (``prompt.system``, ``prompt.tools``): the same ids as
        the SFT demonstrations' prompts of a hybrid run."""
        self.record = record
        if self.system is None:
            return Observation()
        msgs = [{"role": "system", "content": self.system},
                {"role": "user", "content": record["prompt"]}]
        return Observation(messages=msgs, tools=self.schemas)

    async def step(self, turn: Turn) -> StepResult:
        if not turn.tool_calls and not turn.malformed_tool_call:
            return await self.answer(turn)
        info = {"tool_errors": 0.0, "tool_timeouts": 0.0, "invalid_tool_calls": 0.0}
        if turn.malformed_tool_call:  # counted by the loop (malformed_tool_calls)
            return StepResult([{"role": "tool", "content": "error: the tool call could not be "
                                "parsed (expected a JSON object with name and arguments)"}],
                              info=info)
        calls = turn.tool_calls[:self.max_parallel]
        out = list(await asyncio.gather(*(self.call(c, info) for c in calls)))
        for c in turn.tool_calls[self.max_parallel:]:
            info["invalid_tool_calls"] += 1
            out.append({"role": "tool", "name": c.name, "content": f"error: at most "
                        f"{self.max_parallel} tool calls per turn; this one was not run"})
        return StepResult(out, info=info)

    async def call(self, c, info: dict) -> dict:
        def reply(text: str) -> dict:
            return {"role": "tool", "name": c.name, "tool_call_id": c.id, "content": text}

        fn = self.tools.get(c.name)
        if fn is None or c.error:
            info["invalid_tool_calls"] += 1
            why = c.error or f"no tool named {c.name!r} (tools: {', '.join(self.tools)})"
            return reply(f"error: {why}")
        try:
            inspect.signature(fn).bind(**c.arguments)
        except TypeError as err:
            info["invalid_tool_calls"] += 1
            return reply(f"error: {err}")
        try:
            got = await in_thread(fn, c.arguments, self.timeout_s)
        except TimeoutError:
            info["tool_timeouts"] += 1
            return reply(f"error: no result within {self.timeout_s:g}s")
        except Exception as err:  # noqa: BLE001 (the tool's: the model hears of it)
            info["tool_errors"] += 1
            return reply(f"error: {type(err).__name__}: {err}")
        return reply(str(got))

    async def answer(self, turn: Turn) -> StepResult:
        rec = self.record
        fields = {k: [v] for k, v in rec.items() if k not in ("prompt", "id", "demonstration")}
        try:
            text = turn.prefix + turn.text
            got = await in_thread(lambda: self.verifier([rec["prompt"]], [text], **fields),
                                  {}, self.timeout_s)
        except TimeoutError:
            raise ValueError(f"the verifier gave no score within {self.timeout_s:g}s") from None
        if got[0] is None:
            raise ValueError("the verifier could not score the answer")
        return StepResult(reward=float(got[0]), terminated=True,
                          info={"reward_components": {"answer": float(got[0])}})
