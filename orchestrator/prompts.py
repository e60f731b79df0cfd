"""Prompt formatting, in one place: a record becomes the token ids every role sees.

The controller formats each prompt once — the tokenizer's chat template (system message,
generation prompt, template arguments such as ``enable_thinking``) or a plain format string
for base models — and hands *token ids* to the rollout engines, so nothing is re-tokenised
differently downstream: the learner and the reference see the ids the engine generated from.
SFT demonstrations use the same prompt ids, and their completion ends with the
token that ends an assistant turn (``<|im_end|>``, ``<|eot_id|>``, ... — read off the chat
template), which is also a stop token of the engines.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any


class PromptError(ValueError):
    """A record the prompt section cannot format (a template field it lacks)."""


class PromptFormatter:
    """``prompt_ids(record)``, ``completion_ids(text)``, ``fits(record)`` and the stop tokens,
    for one tokenizer and the recipe's ``prompt`` section (``orchestrator.config.PromptConfig``)."""

    def __init__(self, tokenizer, cfg, extra_stop_ids: list[int] = (), max_prompt_tokens=None,
                 generation_eos: list[int] = ()):
        self.tok, self.cfg = tokenizer, cfg
        self.max_prompt_tokens = max_prompt_tokens
        template = None
        if cfg.chat_template:
            template = Path(cfg.chat_template).expanduser().read_text()
        self.chat_template = template
        has_template = bool(template or getattr(tokenizer, "chat_template", None))
        if cfg.style == "chat" and not has_template:
            raise PromptError("prompt.style is chat but the tokenizer has no chat template "
                              "(set prompt.chat_template to a Jinja file, or style: plain)")
        self.chat = cfg.style == "chat" or (cfg.style == "auto" and has_template)
        eos = tokenizer.eos_token_id
        self.end_of_turn = self._end_of_turn() if self.chat else None
        if self.end_of_turn is None:
            self.end_of_turn = eos
        stop = [self.end_of_turn, eos, *generation_eos, *extra_stop_ids]
        self.stop_token_ids = list(dict.fromkeys(i for i in stop if i is not None))
        self._cache: OrderedDict[str, list[int]] = OrderedDict()
        self.tools = None  # the JSON schemas of prompt.tools, for the chat template's tools=
        if getattr(cfg, "tools", None):
            from core.registry import resolve
            from workers.agent.tools import tool_schema

            try:
                self.tools = [tool_schema(resolve(t, f"prompt.tools.{i}"))
                              for i, t in enumerate(cfg.tools)]
            except ValueError as err:
                raise PromptError(f"prompt.tools: {err}") from None

    @classmethod
    def for_model(cls, model_path: str, recipe, max_prompt_tokens: int | None = None):
        """The formatter of a model folder: its tokenizer, its generation config's EOS ids."""
        import json

        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_path)
        eos: list[int] = []
        gen = Path(model_path) / "generation_config.json"
        if gen.is_file():
            value = json.loads(gen.read_text()).get("eos_token_id")
            eos = [value] if isinstance(value, int) else list(value or [])
        return cls(tok, recipe.prompt, recipe.sampling.stop_token_ids, max_prompt_tokens, eos)

    # --- prompts -------------------------------------------------------------------------
    def messages(self, record: dict) -> list[dict[str, Any]]:
        prompt = record["prompt"]
        if isinstance(prompt, list):  # a conversation already
            msgs = [dict(m) for m in prompt]
        else:
            msgs = [{"role": "user", "content": self._fill(record)}]
        if self.cfg.system is not None and msgs[0].get("role") != "system":
            msgs.insert(0, {"role": "system", "content": self.cfg.system})
        return msgs

    def text(self, record: dict) -> str:
        """The prompt as text (for logs and for engines that take text)."""
        if not self.chat:
            if isinstance(record["prompt"], list):
                raise PromptError(f"record {record.get('id')!r}: a prompt that is a list of "
                                  "chat messages needs a chat template (prompt.style)")
            return self._fill(record) + self.cfg.response_prefix
        return self._render(self.messages(record), self.cfg.add_generation_prompt) + \
            self.cfg.response_prefix

    def _render(self, messages: list[dict], generation: bool) -> str:
        return self.tok.apply_chat_template(
            messages, tools=self.tools, tokenize=False, chat_template=self.chat_template,
            **({"add_generation_prompt": generation} | self.cfg.template_kwargs))

    def prompt_ids(self, record: dict) -> list[int]:
        """Token ids of a record's formatted prompt (the tokenisation cached by text)."""
        text = self.text(record)
        ids = self._cache.get(text)
        if ids is None:
            # A chat template writes its own special tokens (BOS included); plain text gets
            # the tokenizer's, as the model saw in pre-training.
            ids = self.tok(text, add_special_tokens=not self.chat).input_ids
            self._cache[text] = ids
            if len(self._cache) > 16384:
                self._cache.popitem(last=False)
        return list(ids)

    def fits(self, record: dict) -> bool:
        """Whether the prompt is within ``max_prompt_tokens`` (always, without a limit)."""
        return self.max_prompt_tokens is None or \
            len(self.prompt_ids(record)) <= self.max_prompt_tokens

    def strip_prefix(self, text: str) -> str:
        """A demonstration as the engine would have written it: without the response prefix
        the prompt already ends with (the R1 traces of OpenR1 start with ``<think>``)."""
        prefix = self.cfg.response_prefix
        return text[len(prefix):] if prefix and text.startswith(prefix) else text

    def completion_ids(self, text: str) -> list[int]:
        """A demonstration's tokens, ending the turn as the model would (its end-of-turn
        token); a demonstration that repeats the response prefix has it removed."""
        ids = self.tok(self.strip_prefix(text), add_special_tokens=False).input_ids
        return ids + [self.end_of_turn]

    def demonstration(self, record: dict) -> tuple[list[int], list[int] | None]:
        """A record's demonstration as completion ids after its prompt, and its loss mask
        (None: every token). A text is one assistant turn (``completion_ids``). A list of chat
        messages is a multi-turn demonstration — assistant turns, tool calls and their outputs,
        the last an assistant's answer — rendered message by message with the chat template as
        the engines would see it: the assistant's content and its end of turn are trained on
        (mask 1), the template's other tokens and every other message's are not (mask 0)."""
        demo = record["demonstration"]
        if isinstance(demo, str):
            return self.completion_ids(demo), None
        where = f"record {record.get('id')!r}: a demonstration that is a list of messages"
        if not self.chat:
            raise PromptError(f"{where} needs a chat template (prompt.style)")
        if not demo or demo[-1].get("role") != "assistant":
            raise PromptError(f"{where} must end with an assistant message")
        msgs = self.messages(record)
        prev = self._render(msgs, True)
        ids: list[int] = []
        mask: list[int] = []
        for k, m in enumerate(demo):
            nxt = demo[k + 1]["role"] if k + 1 < len(demo) else None
            text = self._render(msgs + demo[:k + 1], nxt == "assistant")
            if not text.startswith(prev):
                raise PromptError(f"{where}: the chat template renders its earlier messages "
                                  f"differently once message {k} follows")
            seg = self.tok(text[len(prev):], add_special_tokens=False).input_ids
            trained = 0
            if m.get("role") == "assistant":  # up to and including its end of turn
                trained = seg.index(self.end_of_turn) + 1 if self.end_of_turn in seg \
                    else len(seg)
            ids += seg
            mask += [1] * trained + [0] * (len(seg) - trained)
            prev = text
        return ids, mask

    # --- helpers -------------------------------------------------------------------------
    def _fill(self, record: dict) -> str:
        try:
            return self.cfg.template.format_map(record)
        except KeyError as err:
            raise PromptError(f"prompt.template names {{{err.args[0]}}}, which record "
                              f"{record.get('id')!r} lacks (fields: {', '.join(record)})") \
                from None
        except (IndexError, ValueError, AttributeError) as err:
            raise PromptError(f"prompt.template {self.cfg.template!r}: {err}") from None

    def _end_of_turn(self) -> int | None:
        """The first special token the chat template writes after an assistant message."""
        mark = "\u2603braid\u2603"
        try:
            text = self.tok.apply_chat_template(
                [{"role": "user", "content": "q"}, {"role": "assistant", "content": mark}],
                chat_template=self.chat_template, tokenize=False, **self.cfg.template_kwargs)
        except Exception:  # a template with rules of its own: fall back to EOS
            return None
        tail = text.rpartition(mark)[2]
        special = set(self.tok.all_special_ids) | {
            i for i, t in getattr(self.tok, "added_tokens_decoder", {}).items() if t.special}
        for i in self.tok(tail, add_special_tokens=False).input_ids:
            if i in special:
                return i
        return None


def answer_text(record: dict) -> str:
    """A demonstration's final answer as text (its last assistant message, when it is a
    conversation): what verifiers score."""
    demo = record["demonstration"]
    return demo if isinstance(demo, str) else str(demo[-1].get("content", ""))
