"""Datasets: anything iterable over ``{id, prompt, answer, demonstration?, ...}`` records.

Extra keys of a record travel with it and reach verifiers as keyword arguments (lists aligned
with the completions). The built-in task is synthetic arithmetic with verifiable answers and a
difficulty knob — the number of digits — so it needs no download.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Arithmetic:
    """Addition problems ``a+b=``; the answer is written least-significant digit first.

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

        @model_validator(mode="after")
        def _order(self):
            if not 1 <= self.digits[0] <= self.digits[1]:
                raise ValueError("digits must be [min, max] with 1 <= min <= max")
            if self.width is not None and self.width < self.digits[1]:
                raise ValueError("width must be at least the max digits")
            return self

    def __init__(self, **kwargs):
        self.args = self.Args(**kwargs)

    def _problem(self, rng: random.Random, index: int) -> dict:
        lo, hi = self.args.digits
        d = rng.randint(lo, hi)
        a = rng.randint(10 ** (d - 1) if d > 1 else 0, 10 ** d - 1)
        e = rng.randint(1, d)
        b = rng.randint(10 ** (e - 1) if e > 1 else 0, 10 ** e - 1)
        if rng.random() < 0.5:
            a, b = b, a
        total = str(a + b)
        sa, sb = str(a), str(b)
        if self.args.pad:
            w = self.args.width or self.args.digits[1]
            sa, sb, total = f"{a:0{w}d}", f"{b:0{w}d}", f"{a + b:0{w + 1}d}"
        if self.args.operands_reversed:
            sa, sb = sa[::-1], sb[::-1]
        prompt = f"{sa}+{sb}="
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


class Cursor:
    """Walks a dataset in passes (reshuffling a finite one each pass); state is two ints."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed
        self.epoch, self.offset = 0, 0
        self._it = None

    def _finite(self) -> bool:
        try:
            len(self.dataset)
            return True
        except TypeError:  # no __len__, or a streaming dataset that refuses one
            return False

    def _start(self):
        records = list(self.dataset) if self._finite() else None
        if records is None:
            self._it = iter(self.dataset)
        else:
            random.Random(self.seed + self.epoch).shuffle(records)
            self._it = iter(records)
        for _ in range(self.offset):
            next(self._it)

    def next_batch(self, size: int) -> list[dict]:
        if self._it is None:
            self._start()
        out = []
        while len(out) < size:
            try:
                out.append(next(self._it))
                self.offset += 1
            except StopIteration:
                if self.offset == 0:
                    raise ValueError("dataset is empty") from None
                self.epoch, self.offset = self.epoch + 1, 0
                self._start()
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._it = None  # the next batch replays the pass up to the offset
