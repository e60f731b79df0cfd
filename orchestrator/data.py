"""Datasets: anything iterable over ``{id, prompt, answer, demonstration?, ...}`` records.

Extra keys of a record travel with it and reach verifiers as keyword arguments (lists aligned
with the completions). Built in: :class:`FileDataset` (local JSONL, JSON, parquet, CSV or
``save_to_disk`` folders, or a hub name where a hub is reachable, read with the ``datasets``
library, with a field mapping) and :class:`Arithmetic` (synthetic additions with a difficulty
knob — the number of digits — so the demo needs no download); :class:`ReasoningGym` serves
reasoning-gym's procedural tasks. :class:`Cursor` walks a dataset
in shuffled passes and resumes exactly.
"""

from __future__ import annotations

import decimal
import itertools
import json
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.errors import DataError, DataMissing
from core.registry import resolve


def field_value(row: dict, path: str):
    """The value at a dotted path (``reward_model.ground_truth``, ``target.0.content``); raises
    KeyError when a part is missing.

    >>> field_value({"a": {"b": [{"c": 1}]}}, "a.b.0.c")
    1
    """
    value: Any = row
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, (list, tuple)) and part.lstrip("-").isdigit() and \
                -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            raise KeyError(part)
    return value


class Fields(BaseModel):
    """Which column (a dotted path into nested columns) holds each field braid reads. A field
    left at its default is optional where braid can do without it: ``demonstration``, ``id``
    (generated) and ``bucket`` are read when the column exists; set one to null to ignore a
    column of that name, or to a path to require it."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field("prompt", description="the question: text, or a list of chat messages "
                        "({role, content}) used as the conversation")
    answer: str | None = Field("answer", description="the gold answer verifiers read (null: "
                               "no answer)")
    demonstration: str | None = Field("demonstration", description="a worked solution for SFT "
                                      "(null: none)")
    id: str | None = Field("id", description="a unique id (null, or no such column: "
                           "<file stem>-<row>)")
    bucket: str | None = Field(None, description="a difficulty or category column, copied to "
                               "`bucket` (eval.bucket_key: bucket reports accuracy by it)")


RESERVED = ("id", "prompt", "answer", "demonstration", "bucket")
OPTIONAL = ("demonstration", "id", "bucket")  # may be missing when left at their defaults


def _jsonable(value):
    """A column value as JSON keeps it (records go into checkpoints): dates as ISO text,
    decimals as floats, anything else exotic as its text."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    return str(value)


class FileDataset:
    """Records from a data file or folder, read with the ``datasets`` library.

    ``path`` is a ``.jsonl``/``.json``, ``.parquet``, ``.csv`` or ``.arrow`` file (or a glob of
    them), a folder written by ``Dataset.save_to_disk``, a folder of data files, or — on a
    machine that reaches a hub — a dataset name; the same code reads them all. ``fields`` maps
    braid's fields to columns; every other column travels with the record (verifiers receive it
    as a keyword argument). ``where`` keeps records whose field equals a value (or one of a
    list); ``filter`` names a predicate ``record -> bool``; ``limit`` keeps the first N that
    remain. Every record is checked for the mapped fields when the dataset is built, so a bad
    file fails before a run starts, naming the file, the record and the field.

    Rows stay in Arrow (memory-mapped); :class:`Cursor` shuffles indices, not records.

    >>> import json, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "qa.jsonl")
    >>> with open(path, "w") as f:
    ...     for i in range(3):
    ...         print(json.dumps({"question": f"{i}+1?", "solution": {"final": str(i + 1)},
    ...                           "level": i % 2}), file=f)
    >>> ds = FileDataset(path=path, fields={"prompt": "question", "answer": "solution.final"},
    ...                  where={"level": 0})
    >>> len(ds), ds[1]
    (2, {'id': 'qa-2', 'prompt': '2+1?', 'answer': '3', 'level': 0})
    >>> ds.by_id("qa-2") == ds[1]
    True
    """

    class Args(BaseModel):
        model_config = ConfigDict(extra="forbid")
        path: str = Field(description="data file, glob, folder, or hub dataset name")
        format: Literal["auto", "json", "parquet", "csv", "arrow", "disk", "hub"] = Field(
            "auto", description="auto: from the file extension; a folder written by "
            "save_to_disk is `disk`; a name that is no local path is `hub`")
        split: str = "train"
        subset: str | None = Field(None, description="configuration name of a hub dataset")
        fields: Fields = Field(default_factory=Fields)
        where: dict[str, Any] = Field(default_factory=dict, description="field: value (or a "
                                      "list of values) a record must have")
        filter: str | None = Field(None, description="import path of a predicate record -> bool")
        limit: int | None = Field(None, gt=0, description="keep the first N records that pass")

    _EXT = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv",
            ".arrow": "arrow"}

    def __init__(self, **kwargs):
        self.args = self.Args(**kwargs)
        self.source = self.args.path
        self.table = self._load()
        self.rows = self._select()

    # --- loading -------------------------------------------------------------------------
    def _format(self) -> str:
        a = self.args
        if a.format != "auto":
            return a.format
        path = Path(a.path).expanduser()
        if path.is_dir():
            if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
                return "disk"
            return "folder"
        fmt = self._EXT.get(path.suffix.lower())
        if fmt is not None:
            return fmt
        if "/" in a.path and not path.parent.exists() and not any(c in a.path for c in "*?["):
            return "hub"  # `org/name` that is not a local path
        raise DataMissing(f"{a.path}: no such file or folder (or not a .jsonl, .json, .parquet, "
                        ".csv or .arrow file; set format: to say which)")

    def _load(self):
        import datasets

        a, fmt = self.args, self._format()
        datasets.disable_progress_bars()
        try:
            if fmt == "disk":
                loaded = datasets.load_from_disk(str(Path(a.path).expanduser()))
                if isinstance(loaded, datasets.DatasetDict):
                    if a.split not in loaded:
                        raise DataError(f"{a.path}: no split {a.split!r} (it has "
                                        f"{', '.join(loaded)})")
                    loaded = loaded[a.split]
                return loaded
            if fmt == "hub":
                return datasets.load_dataset(a.path, a.subset, split=a.split)
            if fmt == "folder":
                return datasets.load_dataset(str(Path(a.path).expanduser()), split=a.split)
            return datasets.load_dataset(fmt, data_files=str(Path(a.path).expanduser()),
                                         split="train")
        except DataError:
            raise
        except FileNotFoundError as err:
            raise DataMissing(f"{a.path}: no such file or folder ({err})") from None
        except (StopIteration, datasets.exceptions.DatasetGenerationError, ValueError) as err:
            why = f": {err}" if str(err) else ""
            raise DataError(f"{a.path}: could not be read as {fmt} (empty or malformed?"
                            f"{why})") from None
        except Exception as err:
            raise DataError(f"{a.path}: could not be read as {fmt}: "
                            f"{type(err).__name__}: {err}") from None

    def _select(self) -> list[int]:
        """Indices of the rows that pass the filters, every record checked on the way."""
        a = self.args
        if len(self.table) == 0:
            raise DataError(f"{self.source}: no records")
        columns = set(self.table.column_names)
        self.paths: dict[str, str] = {}  # braid field -> column path, as this file has them
        for name, path in a.fields.model_dump().items():
            if path is None:
                continue
            if path.split(".")[0] in columns:
                self.paths[name] = path
            elif name not in OPTIONAL or name in a.fields.model_fields_set:
                raise DataError(f"{self.source}: no column {path.split('.')[0]!r} for "
                                f"fields.{name} (columns: {', '.join(sorted(columns))})")
        # the big columns travel only under braid's names; small ones (bucket, id) under both
        self.renamed = {self.paths[n].split(".")[0] for n in ("prompt", "answer", "demonstration")
                        if n in self.paths}
        keep: Callable[[dict], bool] | None = resolve(a.filter, "filter") if a.filter else None
        wanted = {k: v if isinstance(v, list) else [v] for k, v in a.where.items()}
        rows, has_demo = [], 0
        self.index: dict[str, int] = {}  # record id -> row (for demonstrations, by id)
        table = self.table
        if keep is None:  # read only the columns the checks need, in batches
            need = {p.split(".")[0] for p in self.paths.values()}
            table = table.select_columns(sorted((need | set(wanted)) & columns))
        for i, row in enumerate(_rows(table)):
            rec = self._record(i, row)
            if rec.get("demonstration") is not None:
                has_demo += 1
            if any(rec.get(k) not in vs for k, vs in wanted.items()):
                continue
            if keep is not None and not keep(rec):
                continue
            if rec["id"] in self.index:
                raise DataError(f"{self.source}: record {i}: id {rec['id']!r} is not unique "
                                f"(fields.id: {self.paths.get('id')})")
            self.index[rec["id"]] = i
            rows.append(i)
            if a.limit is not None and len(rows) == a.limit:
                break
        if "demonstration" in a.fields.model_fields_set and "demonstration" in self.paths and \
                has_demo == 0:
            raise DataError(f"{self.source}: no record has a demonstration in column "
                            f"{a.fields.demonstration!r} (fields.demonstration)")
        if not rows:
            raise DataError(f"{self.source}: no record passes where={a.where} "
                            f"filter={a.filter}")
        return rows

    def _record(self, i: int, row: dict | None = None) -> dict:
        """Row ``i`` of the table as a braid record; raises DataError naming the field that a
        row lacks."""
        row = self.table[i] if row is None else row
        rec: dict[str, Any] = {"id": f"{Path(self.source).stem}-{i}"}
        for name, path in self.paths.items():
            try:
                value = field_value(row, path)
            except KeyError:
                value = None
            if value is None and name in ("prompt", "answer", "id"):
                raise DataError(f"{self.source}: record {i} has no {path!r} "
                                f"(fields.{name})")
            if name == "prompt" and not (isinstance(value, str) and value.strip()
                                         or _is_messages(value)):
                raise DataError(f"{self.source}: record {i}: {path!r} (fields.prompt) is "
                                f"neither text nor a list of chat messages: {value!r:.80}")
            if value is not None:
                rec[name] = str(value) if name == "id" else _jsonable(value)
        for col, value in row.items():
            if col not in RESERVED and col not in self.renamed:
                rec[col] = _jsonable(value)
        return rec

    def by_id(self, pid: str) -> dict | None:
        """The record with this id (None if there is none): demonstrations are fetched again
        by id instead of being kept, or checkpointed, in full."""
        row = self.index.get(pid)
        return None if row is None else self._record(row)

    # --- the dataset protocol ------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self._record(self.rows[i])

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(len(self)))


def _rows(table, batch_size: int = 1024) -> Iterator[dict]:
    for batch in table.iter(batch_size=batch_size):
        keys = list(batch)
        yield from (dict(zip(keys, values)) for values in zip(*batch.values()))


def _is_messages(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"),
                                                                               str)
        for m in value)


class Arithmetic:
    """Addition problems ``a+b=`` (or, with ``op: "-"``, subtractions ``a-b=`` with a >= b > 0);
    the answer is written least-significant digit first.

    Small transformers learn reversed-order sums far faster than plain ones (Lee et al., 2023,
    "Teaching Arithmetic to Small Transformers"), so the demo can show learning in minutes.
    Each record carries ``digits`` (the longer operand's length) as its difficulty bucket.

    >>> r = next(iter(Arithmetic(digits=[3, 3], size=1, seed=0)))
    >>> r["prompt"].endswith("="), r["answer"] == str(sum(map(int, r["prompt"][:-1].split("+"))))
    (True, True)
    >>> r["demonstration"] == r["answer"][::-1]
    True
    """

    class Args(BaseModel):
        model_config = ConfigDict(extra="forbid")
        digits: tuple[int, int] = Field((1, 3), description="min and max operand length")
        size: int | None = Field(None, gt=0, description="a fixed set of this many problems; "
                                 "None streams fresh problems forever")
        seed: int = 0
        pad: bool = Field(False, description="zero-pad operands to the max digit count and the "
                          "reversed answer to one digit more: every digit sits at a fixed "
                          "position, which tiny models learn much faster")
        width: int | None = Field(None, gt=0, description="padding width (default: max "
                                  "digits); set it past the training digits to keep one format "
                                  "for an out-of-distribution eval with longer operands")
        operands_reversed: bool = Field(False, description="write the operands least-"
                                        "significant digit first too: each answer digit then "
                                        "sits at a fixed distance from its operand digits")
        op: Literal["+", "-"] = Field("+", description="'-': subtractions a-b with a >= b > 0 "
                                      "(b = 0 would read the same as a+0)")
        negative: bool = Field(False, description="op '-' only: a < b instead, the answer a "
                               "negative number: '-' then the digits of b-a (reversed: the "
                               "digits, then '-')")

        @model_validator(mode="after")
        def _order(self):
            if not 1 <= self.digits[0] <= self.digits[1]:
                raise ValueError("digits must be [min, max] with 1 <= min <= max")
            if self.width is not None and self.width < self.digits[1]:
                raise ValueError("width must be at least the max digits")
            if self.negative and self.op != "-":
                raise ValueError("negative answers need op '-'")
            return self

    def __init__(self, **kwargs):
        self.args = self.Args(**kwargs)

    def _problem(self, rng: random.Random, index: int) -> dict:
        lo, hi = self.args.digits
        d = rng.randint(lo, hi)
        if self.args.op == "-":  # operands >= 1 (a-0 reads like a+0), distinct for negatives
            e = rng.randint(1, d)
            while True:
                a = rng.randint(10 ** (d - 1) if d > 1 else 1, 10 ** d - 1)
                b = rng.randint(10 ** (e - 1) if e > 1 else 1, 10 ** e - 1)
                if a != b or not self.args.negative:
                    break
            a, b = (min(a, b), max(a, b)) if self.args.negative else (max(a, b), min(a, b))
            result = a - b
        else:
            a = rng.randint(10 ** (d - 1) if d > 1 else 0, 10 ** d - 1)
            e = rng.randint(1, d)
            b = rng.randint(10 ** (e - 1) if e > 1 else 0, 10 ** e - 1)
            if rng.random() < 0.5:
                a, b = b, a
            result = a + b
        total = str(result)
        sa, sb = str(a), str(b)
        if self.args.pad:
            w = self.args.width or self.args.digits[1]
            sa, sb = f"{a:0{w}d}", f"{b:0{w}d}"
            total = ("-" if result < 0 else "") + f"{abs(result):0{w + 1}d}"
        if self.args.operands_reversed:
            sa, sb = sa[::-1], sb[::-1]
        prompt = f"{sa}{self.args.op}{sb}="
        return {"id": f"arith-{self.args.seed}-{index}", "prompt": prompt, "answer": total,
                "demonstration": total[::-1], "reverse": True, "digits": d}

    def __iter__(self) -> Iterator[dict]:
        rng = random.Random(self.args.seed)
        if self.args.size is None:
            i = 0
            while True:
                yield self._problem(rng, i)
                i += 1
        else:
            yield from (self._problem(rng, i) for i in range(self.args.size))

    def __len__(self) -> int:
        if self.args.size is None:
            raise TypeError("a streaming Arithmetic dataset has no length")
        return self.args.size


class ToolArithmetic(Arithmetic):
    """Multiplications too long to do in one's head (``What is 4821 * 93?``), each with a
    demonstration that uses the python tool (workers/agent/tools.py): a call in the hermes
    format, the tool's output, the answer — a multi-turn demonstration, for SFT on tool use
    before RL with the tool live (recipes/agent_tools_smollm2.yaml). ``digits``: the operands'
    lengths, each drawn from [min, max]; the record's ``digits`` bucket is the longer one's.

    >>> r = next(iter(ToolArithmetic(size=1, seed=0)))
    >>> a, b = r["prompt"][len("What is "):-1].split(" * ")
    >>> r["answer"] == str(int(a) * int(b)) == r["demonstration"][-1]["content"]
    True
    >>> [m["role"] for m in r["demonstration"]]
    ['assistant', 'tool', 'assistant']
    """

    class Args(BaseModel):
        model_config = ConfigDict(extra="forbid")
        digits: tuple[int, int] = Field((2, 4), description="min and max operand length")
        size: int | None = Field(None, gt=0, description="a fixed set of this many problems; "
                                 "None streams fresh problems forever")
        seed: int = 0

        @model_validator(mode="after")
        def _order(self):
            if not 1 <= self.digits[0] <= self.digits[1]:
                raise ValueError("digits must be [min, max] with 1 <= min <= max")
            return self

    def _problem(self, rng: random.Random, index: int) -> dict:
        lo, hi = self.args.digits
        da, db = rng.randint(lo, hi), rng.randint(lo, hi)
        a, b = rng.randint(10 ** (da - 1), 10 ** da - 1), rng.randint(10 ** (db - 1), 10 ** db - 1)
        call = json.dumps({"name": "python", "arguments": {"code": f"print({a} * {b})"}})
        return {"id": f"toolarith-{self.args.seed}-{index}", "prompt": f"What is {a} * {b}?",
                "answer": str(a * b), "digits": max(da, db), "demonstration": [
                    {"role": "assistant", "content": f"<tool_call>\n{call}\n</tool_call>"},
                    {"role": "tool", "content": f"{a * b}\n"},
                    {"role": "assistant", "content": str(a * b)}]}


class GymTask(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="a reasoning-gym task (dataset) name, e.g. chain_sum")
    weight: float = Field(1.0, gt=0, description="its share of the records")
    config: dict[str, Any] = Field(default_factory=dict, description="fields of the task's "
                                   "own config dataclass (e.g. min_terms), seed and size aside")


class ReasoningGym:
    """Procedural tasks from reasoning-gym (``pip install 'braid-rl[gym]'``; 100+ offline
    generators, each with its own scorer), mixed by weight. Score with ``rewards.gym:
    reasoning_gym`` — the task's own ``score_answer`` on the ``<answer>`` of the completion.

    A record: ``id`` ``rg-<task>-<seed>-<j>`` (the task's j-th entry), ``prompt`` (the
    question), ``answer`` (None for tasks with many right answers), ``task``, ``metadata`` (the
    entry's, as JSON keeps it: records may go into checkpoints), and ``demonstration``
    (``<answer>answer</answer>``) when there is an answer. Each task is checked once when the
    dataset is built: its first entry's own answer must score 1.0 after the trip through JSON.

    reasoning-gym seeds entry j of a task with ``seed + j``, so its seeds 1 and 2 share all but
    one entry: braid gives it ``seed * 10**6`` (a train and an eval seed never overlap below a
    million records per task; numpy, in some tasks, takes seeds below 2**32).

    >>> ds = ReasoningGym(tasks=["chain_sum", {"name": "spell_backward", "weight": 2}], size=4)
    >>> [r["id"] for r in ds]
    ['rg-spell_backward-0-0', 'rg-spell_backward-0-1', 'rg-spell_backward-0-2', 'rg-chain_sum-0-0']
    >>> r = next(iter(ds)); r["prompt"]
    'Spell this word backward (example: sun -> nus): hypomeron'
    >>> r["answer"], r["task"], r["demonstration"]
    ('noremopyh', 'spell_backward', '<answer>noremopyh</answer>')
    """

    STRIDE = 10**6

    class Args(BaseModel):
        model_config = ConfigDict(extra="forbid")
        tasks: list[GymTask | str] = Field(min_length=1, description="task names, or "
                                           "{name, weight, config}")
        size: int | None = Field(None, gt=0, description="a fixed set of this many records; "
                                 "None streams fresh ones")
        seed: int = Field(0, ge=0, le=4000, description="train and eval need different seeds")

    def __init__(self, **kwargs):
        self.args = self.Args(**kwargs)
        self.tasks = [GymTask(name=t) if isinstance(t, str) else t for t in self.args.tasks]
        if len({t.name for t in self.tasks}) != len(self.tasks):
            raise DataError(f"tasks: a task is named twice: {[t.name for t in self.tasks]}")
        self.sets = [self._create(t) for t in self.tasks]

    def _create(self, task: GymTask):
        try:
            import reasoning_gym
            from reasoning_gym.factory import DATASETS
        except ImportError:
            raise DataError("orchestrator.data:ReasoningGym needs reasoning-gym: pip install "
                            "'braid-rl[gym]' (make setup installs it)") from None
        if task.name not in DATASETS:
            import difflib

            near = difflib.get_close_matches(task.name, list(DATASETS), n=3)
            raise DataError(f"reasoning-gym has no task {task.name!r}"
                            + (f" (did you mean {', '.join(near)}?)" if near else ""))
        try:
            data = reasoning_gym.create_dataset(task.name, seed=self.args.seed * self.STRIDE,
                                                size=self.STRIDE, **task.config)
            entry = json.loads(json.dumps(data[0]))
            score = data.score_answer(entry["answer"], entry)
        except Exception as err:  # the task's config dataclass or generator refused
            raise DataError(f"reasoning-gym task {task.name} (config {task.config}): "
                            f"{type(err).__name__}: {err}") from None
        if entry["answer"] is not None and score != 1.0:
            raise DataError(f"reasoning-gym task {task.name}: its scorer gives its own answer "
                            f"{score} once the entry went through JSON: not usable here")
        return data

    def _record(self, k: int, j: int) -> dict:
        if j >= self.STRIDE:
            raise DataError(f"reasoning-gym task {self.tasks[k].name}: more than "
                            f"{self.STRIDE} records would reach the next seed's")
        name, e = self.tasks[k].name, self.sets[k][j]
        rec = {"id": f"rg-{name}-{self.args.seed}-{j}", "prompt": e["question"],
               "answer": e["answer"], "task": name,
               "metadata": json.loads(json.dumps(e["metadata"]))}
        if e["answer"] is not None:
            rec["demonstration"] = f"<answer>{e['answer']}</answer>"
        return rec

    def __iter__(self) -> Iterator[dict]:
        rng = random.Random(self.args.seed)
        weights, counts = [t.weight for t in self.tasks], [0] * len(self.tasks)
        for _ in range(self.args.size) if self.args.size else itertools.count():
            k = rng.choices(range(len(self.tasks)), weights)[0]
            yield self._record(k, counts[k])
            counts[k] += 1

    def __len__(self) -> int:
        if self.args.size is None:
            raise TypeError("a streaming ReasoningGym dataset has no length")
        return self.args.size


class MixturePart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, description="the family its records are tagged with")
    cls: str = Field(description="the part's dataset, `module:Name`")
    args: dict[str, Any] = Field(default_factory=dict)
    weight: float = Field(1.0, gt=0, description="its share of a stream")


class Mixture:
    """Several datasets as one, each record tagged with its part's ``name`` in ``family``
    (report by it with ``eval.bucket_key: family``) and its id prefixed by it.

    Parts that all have a length and no ``weight`` are concatenated (a fixed set, e.g. an eval
    set with an out-of-distribution part). Otherwise — or with ``stream: true`` — the mixture
    streams: each record comes from a part drawn with probability proportional to its
    ``weight`` (seeded); a finite part is walked in passes, each reshuffled. Compare
    ``datasets.interleave_datasets``; this one mixes braid's own datasets too.

    >>> parts = [{"name": "add", "cls": "orchestrator.data:Arithmetic", "args": {"size": 2}},
    ...          {"name": "sub", "cls": "orchestrator.data:Arithmetic",
    ...           "args": {"size": 1, "op": "-"}}]
    >>> [(r["family"], r["id"]) for r in Mixture(parts=parts)]
    [('add', 'add/arith-0-0'), ('add', 'add/arith-0-1'), ('sub', 'sub/arith-0-0')]
    >>> parts[0]["args"], parts[0]["weight"] = {}, 3.0  # "add" streams: a 3:1 stream
    >>> import itertools; sorted({r["family"] for r in itertools.islice(Mixture(parts=parts), 40)})
    ['add', 'sub']
    """

    class Args(BaseModel):
        model_config = ConfigDict(extra="forbid")
        parts: list[MixturePart] = Field(min_length=1)
        seed: int = Field(0, description="seeds the choice of part in a stream")
        stream: bool | None = Field(None, description="draw parts by weight forever (true) or "
                                    "concatenate them (false); default: concatenate when every "
                                    "part has a fixed size and none a weight")

        @model_validator(mode="after")
        def _names(self):
            names = [p.name for p in self.parts]
            if len(set(names)) != len(names):
                raise ValueError(f"part names must differ: {names}")
            return self

    def __init__(self, **kwargs):
        self.args = self.Args(**kwargs)
        self.parts = []
        for i, p in enumerate(self.args.parts):
            cls = resolve(p.cls, f"parts[{i}].cls")
            try:
                self.parts.append(cls(**p.args))
            except Exception as e:  # a DataMissing stays one (validate: "not on this machine")
                kind = type(e) if isinstance(e, DataError) else ValueError
                raise kind(f"parts[{i}] ({p.name}, {p.cls}): {e}") from e
        self.sizes = [dataset_size(d) for d in self.parts]
        weighted = any("weight" in p.model_fields_set for p in self.args.parts)
        self.stream = self.args.stream if self.args.stream is not None else \
            weighted or any(n is None for n in self.sizes)
        if not self.stream and any(n is None for n in self.sizes):
            raise ValueError("stream: false concatenates the parts, but "
                             + ", ".join(p.name for p, n in zip(self.args.parts, self.sizes)
                                         if n is None) + " never ends")
        if not self.stream and weighted:
            raise ValueError("stream: false concatenates the parts: a weight means nothing")
        if empty := [p.name for p, n in zip(self.args.parts, self.sizes) if n == 0]:
            raise ValueError(f"part {', '.join(empty)} has no records")

    def _tag(self, part: MixturePart, record: dict) -> dict:
        return {**record, "id": f"{part.name}/{record['id']}", "family": part.name}

    def __iter__(self) -> Iterator[dict]:
        if not self.stream:
            for part, data in zip(self.args.parts, self.parts):
                yield from (self._tag(part, r) for r in data)
            return
        rng = random.Random(self.args.seed)
        # each part walked as training walks a dataset: a finite one reshuffled every pass
        cursors = [Cursor(d, self.args.seed + i) for i, d in enumerate(self.parts)]
        weights = [p.weight for p in self.args.parts]
        while True:
            i = rng.choices(range(len(cursors)), weights)[0]
            yield self._tag(self.args.parts[i], cursors[i].next_batch(1)[0])

    def __len__(self) -> int:
        if self.stream:
            raise TypeError("a streaming Mixture has no length")
        return sum(self.sizes)


def dataset_size(dataset) -> int | None:
    """``len(dataset)``, or None for a stream (no ``__len__``, or one that refuses)."""
    try:
        return len(dataset)
    except TypeError:
        return None


class Cursor:
    """Walks a dataset in passes, reshuffling a finite one each pass (seeded by the pass
    number), so that its state is two ints and a resume lands on the same record. A dataset
    with ``__getitem__`` is shuffled by index and resumed by jumping; others are listed (or,
    when streaming, replayed up to the offset).

    ``keep`` (a predicate) skips records — e.g. prompts too long for the engine; they are
    counted in ``skipped`` and still advance the offset, so a resume skips the same ones.
    """

    def __init__(self, dataset, seed: int, keep: Callable[[dict], bool] | None = None):
        self.dataset, self.seed, self.keep = dataset, seed, keep
        self.epoch, self.offset = 0, 0
        self.skipped = 0
        self._it: Iterator[dict] | None = None

    def _size(self) -> int | None:
        return dataset_size(self.dataset)

    def _start(self):
        n = self._size()
        if n is None:
            self._it = iter(self.dataset)
            for _ in range(self.offset):
                next(self._it)
            return
        indexable = isinstance(self.dataset, (Sequence, FileDataset))
        records = None if indexable else list(self.dataset)
        order = list(range(n))
        random.Random(self.seed + self.epoch).shuffle(order)
        if indexable:
            self._it = (self.dataset[i] for i in order[self.offset:])
        else:
            self._it = (records[i] for i in order[self.offset:])

    def next_batch(self, size: int) -> list[dict]:
        if self._it is None:
            self._start()
        out: list[dict] = []
        run = 0  # records skipped since the last one kept
        limit = self._size() or 10_000
        while len(out) < size:
            try:
                rec = next(self._it)
            except StopIteration:
                if self.offset == 0:
                    raise ValueError("dataset is empty") from None
                self.epoch, self.offset = self.epoch + 1, 0
                self._start()
                continue
            self.offset += 1
            if self.keep is not None and not self.keep(rec):
                self.skipped += 1
                run += 1
                if run >= limit:
                    raise ValueError(f"{run} records in a row were skipped (every prompt too "
                                     "long?): none is left to train on")
                continue
            run = 0
            out.append(rec)
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "skipped": self.skipped}

    def load_state(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self.skipped = int(state.get("skipped", 0))
        self._it = None  # the next batch starts at the saved offset
