"""Learned rewards: a scalar reward model and a generative judge, each a reward role's worker.

- :class:`RewardModelWorker` scores ``prompt + completion`` with a transformers
  ``AutoModelForSequenceClassification`` that has one output (a Bradley-Terry style reward
  model). Use it when a trained reward model exists: one forward pass per sample, cheap enough to
  score every rollout of every step.
- :class:`JudgeRewardWorker` asks an LLM (a vLLM engine) to grade each completion with a prompt
  template and parses a number out of its reply. Use it when there is no reward model but a
  capable instruct model can tell good answers from bad; it costs a generation per sample and
  its grades are coarse (``max_score + 1`` levels by default).

Rule-based verifiers (:mod:`workers.reward`) remain the better choice whenever the answer can be
checked exactly. A recipe has one reward role; it picks the worker class and its arguments::

    roles:
      reward:
        cls: "workers.reward_model:RewardModelWorker"
        replicas: 2
        resources: {num_cpus: 1, num_gpus: 1}
        args: {model: /models/my-reward-model, micro_batch_size: 16, max_length: 2048}

    roles:
      reward:
        cls: "workers.reward_model:JudgeRewardWorker"
        resources: {num_cpus: 2, num_gpus: 1}
        args:
          model: /models/judge-instruct
          chat: true
          template: |
            Question: {prompt}
            Reference answer: {answer}
            Response: {completion}
            Grade the response from 0 to 10. Reply as "Score: N".

Batching: the controller sends every reward replica the step's rollout refs with
``shard=(k, replicas)``; replica ``k`` scores the ``k``-th contiguous slice
(``Rollouts.shard``), so the number of replicas (``roles.reward.replicas``) divides the work,
whatever the number of rollout engines. Within a replica the reward model runs micro-batches of
``micro_batch_size`` sequences sorted by length (little padding); the judge hands its whole
slice to vLLM, which batches on its own.

A sample that cannot be scored (a non-finite reward-model output; a judge reply without a grade,
a template field the record lacks, a judge prompt longer than ``max_model_len``) scores ``None``,
is counted in ``Scores.failures[name]`` and its id (``<record id>#<k>``) is logged and listed in
``Scores.failed_ids``, as for the rule verifiers. Engine or model errors are not caught: the
actor fails and the controller's recovery replaces it.
"""

from __future__ import annotations

import logging
import math
import os
import re
import string
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from workers.base import RewardWorker
from workers.reward import responses, shard_with_ids
from workers.types import Scores

log = logging.getLogger("braid.reward")

Dtype = Literal["float32", "bfloat16", "float16"]


def _report(scores: Scores, name: str, ids: list[str], raw: list[float | None],
            why: str = "") -> None:
    failed = [ids[i] for i, v in enumerate(raw) if v is None]
    if failed:
        scores.failures[name] = len(failed)
        scores.failed_ids.extend(failed)
        log.warning("%s could not score %d sample(s)%s: %s", name, len(failed),
                    f" ({why})" if why else "", ", ".join(failed[:20]))


# --------------------------------------------------------------------------------------------
# Scalar reward model


class RewardModelWorker(RewardWorker):
    """A sequence classifier with one output scores each ``prompt + completion``.

    ``reward = weight * (raw - shift) * scale``; ``Scores.per_verifier[name]`` holds the raw
    outputs. Sequences longer than ``max_length`` tokens are truncated from the left, keeping
    the end of the completion (what is being judged) and the tokenizer's leading special tokens
    (BOS); the start of the prompt is what is lost.

    Pooling: transformers' classifiers (Llama, Qwen2, Mistral, ...) read the score at the last
    token that is not ``config.pad_token_id``. Batches are padded on the right with exactly that
    id (the tokenizer's pad token, else its EOS, written into the config when the config has
    none), so every row is read at its own last token. A text whose last token *is* the pad id
    (an EOS-as-pad model scoring a text ending in EOS) is read one token early, as it would be
    by transformers itself.
    """

    class Args(BaseModel):
        model_config = ConfigDict(extra="forbid")
        model: str = Field(description="folder (or hub id) of a sequence classifier, num_labels=1")
        micro_batch_size: int = Field(16, gt=0, description="sequences per forward pass")
        max_length: int | None = Field(
            None, gt=1, description="tokens per sequence, truncated from the left so the end "
            "of the completion is kept (default: the model's max_position_embeddings)")
        chat_template: bool = Field(
            False, description="format as a user/assistant conversation with the tokenizer's "
            "chat template (most released reward models expect it) instead of prompt+completion")
        name: str = Field("reward_model", description="metric name")
        weight: float = 1.0
        shift: float = Field(0.0, description="reward = weight * (raw - shift) * scale")
        scale: float = 1.0
        dtype: Dtype | None = Field(None, description="default: model.dtype of the recipe")
        threads: int | None = Field(None, description="torch threads (default: role num_cpus)")

    def setup(self, **_) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.set_threads(self.args.threads)
        self._torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = self.args.dtype or (self.recipe.model.dtype if self.recipe else "float32")
        self.model = AutoModelForSequenceClassification.from_pretrained(
            self.args.model, dtype=getattr(torch, dtype)).to(self.device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"{self.args.model}: a reward model has one output, this one has "
                             f"num_labels={self.model.config.num_labels}")
        tok = AutoTokenizer.from_pretrained(self.args.model)
        tok.truncation_side = "left"
        self.tok = tok
        cfg = self.model.config.get_text_config()
        if cfg.pad_token_id is None:
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            if pad is None:
                raise ValueError(f"{self.args.model}: neither the config nor the tokenizer "
                                 "names a pad or EOS token")
            cfg.pad_token_id = self.model.config.pad_token_id = pad
        self.pad_id = cfg.pad_token_id
        self.max_length = self.args.max_length or getattr(cfg, "max_position_embeddings", None)
        if self.args.chat_template and not tok.chat_template:
            raise ValueError(f"{self.args.model}: chat_template is set but the tokenizer has "
                             "no chat template")

    def encode(self, prompt, completion: str) -> list[int]:
        """The token ids the model scores for one sample (truncated to ``max_length``); a
        prompt is text or a conversation ((role, content) pairs, as a dataset may hold)."""
        trunc = {"truncation": self.max_length is not None, "max_length": self.max_length}
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else \
            [{"role": role, "content": content} for role, content in prompt]
        if self.args.chat_template:
            text = self.tok.apply_chat_template(
                turns + [{"role": "assistant", "content": completion}], tokenize=False)
            return self.tok(text, add_special_tokens=False, **trunc)["input_ids"]
        text = "\n".join(t["content"] for t in turns)
        return self.tok(text + completion, **trunc)["input_ids"]

    def raw_scores(self, seqs: list[list[int]]) -> list[float]:
        """Model outputs for token sequences: sorted by length, right-padded micro-batches,
        returned in the given order."""
        torch = self._torch
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out = [math.nan] * len(seqs)
        mb = self.args.micro_batch_size
        with torch.no_grad():
            for s in range(0, len(order), mb):
                idx = order[s:s + mb]
                width = max(len(seqs[i]) for i in idx)
                ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    ids[row, :len(seqs[i])] = torch.tensor(seqs[i])
                    mask[row, :len(seqs[i])] = 1
                logits = self.model(input_ids=ids.to(self.device),
                                    attention_mask=mask.to(self.device)).logits
                for i, v in zip(idx, logits[:, 0].float().cpu().tolist()):
                    out[i] = v
        return out

    def score(self, rollout_parts, records: list[dict], shard: tuple[int, int] = (0, 1)) -> Scores:
        """Scores of the ``shard[0]``-th of ``shard[1]`` slices of the rollouts."""
        r, ids = shard_with_ids(rollout_parts, records, shard)
        pairs = [(_hashable(records[p]["prompt"]), c)
                 for p, c in zip(r.prompt_index, responses(r, self.recipe))]
        unique = list(dict.fromkeys(pairs))  # GRPO groups often repeat a completion
        seqs = [self.encode(p, c) for p, c in unique]
        by_pair = dict(zip(unique, self.raw_scores(seqs)))
        raw = [v if math.isfinite(v := by_pair[pc]) else None for pc in pairs]
        a = self.args
        scores = Scores(rewards=[None if v is None else a.weight * (v - a.shift) * a.scale
                                 for v in raw], per_verifier={a.name: raw})
        _report(scores, a.name, ids, raw, "non-finite reward-model output")
        return scores

    def shutdown(self) -> None:
        self.model = None


def _hashable(prompt):
    """A prompt as a dictionary key: text, or a conversation as (role, content) pairs."""
    if isinstance(prompt, str):
        return prompt
    return tuple((m["role"], m["content"]) for m in prompt)


# --------------------------------------------------------------------------------------------
# Generative judge

DEFAULT_TEMPLATE = """You are grading a response to a task.

Task:
{prompt}

Response:
{completion}

Rate the response from 0 (wrong or useless) to 10 (fully correct and helpful). \
Reply with one line of the form "Score: N".
"""
DEFAULT_PATTERN = r"Score:\s*([0-9]+(?:\.[0-9]+)?)"


def parse_grade(text: str, pattern: str, max_score: float) -> float | None:
    """The first match of ``pattern``'s group in ``text`` divided by ``max_score``, clipped to
    [0, 1]; None when nothing matches or the group is not a finite number.

    >>> parse_grade("Score: 7", r"Score:\\s*([0-9]+(?:\\.[0-9]+)?)", 10)
    0.7
    >>> parse_grade("I think... Score: 7.5 overall", r"Score:\\s*([0-9]+(?:\\.[0-9]+)?)", 10)
    0.75
    >>> parse_grade("Score: 12", r"Score:\\s*([0-9]+(?:\\.[0-9]+)?)", 10)
    1.0
    >>> parse_grade("no grade here", r"Score:\\s*([0-9]+(?:\\.[0-9]+)?)", 10) is None
    True
    """
    m = re.search(pattern, text)
    if m is None or m.group(1) is None:
        return None
    try:
        v = float(m.group(1))
    except ValueError:
        return None
    if not math.isfinite(v):
        return None
    return min(1.0, max(0.0, v / max_score))


def template_fields(template: str) -> set[str]:
    """Names a ``str.format`` template fills (``{answer.x}`` and ``{answer[0]}`` name
    ``answer``); ValueError for a malformed template or a positional field.

    >>> sorted(template_fields("{prompt} -> {completion} (want {answer})"))
    ['answer', 'completion', 'prompt']
    """
    names = set()
    for _, field, spec, _ in string.Formatter().parse(template):
        if field is None:
            continue
        root = re.split(r"[.\[]", field, maxsplit=1)[0]
        if root == "" or root.isdigit():
            raise ValueError(f"positional field {{{field}}}: name the field, e.g. {{prompt}}")
        names.add(root)
        if spec:
            names |= template_fields(spec)  # nested fields in a format spec
    return names


class JudgeRewardWorker(RewardWorker):
    """An LLM grades each completion; ``reward = weight * clip(grade / max_score, 0, 1)``.

    The judge prompt is ``template.format(prompt=..., completion=..., **record)``: any field of
    the step's records (``answer``, ...) can appear in it. With ``chat: true`` it is sent as the
    user turn of the judge's chat template. Decoding is greedy (temperature 0, a fixed seed), so
    a grade is reproducible; the reply's first match of ``pattern`` is the grade.
    ``Scores.per_verifier[name]`` holds the normalised grade before ``weight``.
    """

    class Args(BaseModel):
        model_config = ConfigDict(extra="forbid")
        model: str = Field(description="folder (or hub id) of the judge LLM")
        template: str = Field(DEFAULT_TEMPLATE, description="str.format template of the judge "
                              "prompt: {prompt}, {completion} and any record field")
        pattern: str = Field(DEFAULT_PATTERN, description="regex whose one group is the grade")
        max_score: float = Field(10.0, gt=0, description="grade that maps to reward 1")
        max_tokens: int = Field(32, gt=0, description="reply length limit")
        chat: bool = Field(False, description="wrap the prompt in the judge's chat template")
        name: str = Field("judge", description="metric name")
        weight: float = 1.0
        max_model_len: int = Field(4096, gt=1)
        tensor_parallel_size: int = Field(1, ge=1)
        gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
        cpu_kv_cache_gb: float = Field(1.0, gt=0, description="VLLM_CPU_KVCACHE_SPACE on CPU")
        enforce_eager: bool = True
        dtype: Dtype | None = Field(None, description="default: model.dtype of the recipe")
        threads: int | None = Field(None, description="torch threads (default: role num_cpus)")

        @field_validator("template")
        @classmethod
        def _template(cls, v: str) -> str:
            fields = template_fields(v)  # ValueError: reported with the field's path
            if "completion" not in fields:
                raise ValueError("the template must contain {completion}")
            return v

        @field_validator("pattern")
        @classmethod
        def _pattern(cls, v: str) -> str:
            try:
                groups = re.compile(v).groups
            except re.error as err:
                raise ValueError(f"not a regular expression: {err}") from None
            if groups != 1:
                raise ValueError(f"the pattern needs exactly one group (the grade), has {groups}")
            return v

    def setup(self, **_) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(self.args.cpu_kv_cache_gb))))
        self.set_threads(self.args.threads)
        from vllm import LLM

        a = self.args
        seed = self.recipe.seed if self.recipe else 0
        self.seed = seed
        self.llm = LLM(
            model=a.model, dtype=a.dtype or (self.recipe.model.dtype if self.recipe else "auto"),
            seed=seed + self.ctx.rank, max_model_len=a.max_model_len,
            enforce_eager=a.enforce_eager, tensor_parallel_size=a.tensor_parallel_size,
            gpu_memory_utilization=a.gpu_memory_utilization,
        )
        self.tok = self.llm.get_tokenizer()
        if a.chat and not getattr(self.tok, "chat_template", None):
            raise ValueError(f"{a.model}: chat is set but the tokenizer has no chat template")

    def judge_prompt(self, record: dict, completion: str) -> str:
        """The judge's prompt text for one sample; KeyError/IndexError/AttributeError when the
        template names a field the record lacks."""
        prompt = record.get("prompt")
        if isinstance(prompt, list):  # a conversation: the judge reads its turns as text
            prompt = "\n\n".join(m["content"] for m in prompt if m.get("role") != "system")
        text = self.args.template.format(**{**record, "prompt": prompt,
                                            "completion": completion})
        if self.args.chat:
            text = self.tok.apply_chat_template([{"role": "user", "content": text}],
                                                tokenize=False, add_generation_prompt=True)
        return text

    def _prompt_ids(self, record: dict, completion: str) -> tuple[list[int] | None, tuple]:
        """Token ids of the judge prompt, or None and (failure kind, detail)."""
        try:
            text = self.judge_prompt(record, completion)
        except (KeyError, IndexError, AttributeError) as err:
            return None, ("template field missing", repr(err))
        ids = self.tok(text, add_special_tokens=not self.args.chat)["input_ids"]
        if len(ids) >= self.args.max_model_len:
            return None, ("prompt too long", f"{len(ids)} tokens >= max_model_len")
        return ids, ()

    def score(self, rollout_parts, records: list[dict], shard: tuple[int, int] = (0, 1)) -> Scores:
        """Scores of the ``shard[0]``-th of ``shard[1]`` slices of the rollouts."""
        from vllm import SamplingParams

        a = self.args
        r, ids = shard_with_ids(rollout_parts, records, shard)
        keys = [(p, c) for p, c in zip(r.prompt_index, responses(r, self.recipe))]
        unique = list(dict.fromkeys(keys))
        grades: dict[tuple[int, str], float | None] = {}
        why: dict[tuple[int, str], tuple[str, str]] = {}  # failure kind, detail
        todo, prompts, params = [], [], []
        for p, c in unique:
            pids, err = self._prompt_ids(records[p], c)
            if pids is None:
                grades[(p, c)], why[(p, c)] = None, err
                continue
            todo.append((p, c))
            prompts.append({"prompt_token_ids": pids})
            params.append(SamplingParams(
                temperature=0.0, seed=self.seed,
                max_tokens=min(a.max_tokens, a.max_model_len - len(pids))))
        if todo:
            outs = self.llm.generate(prompts, params, use_tqdm=False)
            for key, out in zip(todo, outs):
                reply = out.outputs[0].text
                grades[key] = parse_grade(reply, a.pattern, a.max_score)
                if grades[key] is None:
                    why[key] = ("no grade in reply", repr(reply[:200]))
        raw = [grades[k] for k in keys]
        scores = Scores(rewards=[None if v is None else a.weight * v for v in raw],
                        per_verifier={a.name: raw})
        tally: dict[str, int] = {}
        for k in keys:
            if k in why:
                tally[why[k][0]] = tally.get(why[k][0], 0) + 1
        _report(scores, a.name, ids, raw, ", ".join(f"{k}: {n}" for k, n in tally.items()))
        for kind, detail in {kind: detail for kind, detail in why.values()}.items():
            log.info("%s: %s, e.g. %s", a.name, kind, detail)
        return scores

    def shutdown(self) -> None:
        self.llm = None  # the engine's processes exit with it
