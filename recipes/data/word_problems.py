"""Grade-school word problems with verifiable integer answers, sized for a ~135M chat model.

Five families of one- and two-step problems over small numbers (``add``, ``sub``, ``mul``,
``times``: "twice/three times as many", ``two_step``: add then subtract). Each record is
``{"id", "prompt", "answer", "demonstration", "family"}``; the answer is the number as a string
and every demonstration is a short worked solution ending in the line ``The answer is N.``.
The train and test sets are drawn from separate seeds and share no prompt.

Regenerate ``recipes/data/word_problems/{train,test}.jsonl`` (stdlib only, deterministic)::

    python recipes/data/word_problems.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Tom", "Sara", "Ben", "Mia", "Leo", "Emma", "Sam", "Lily", "Max", "Anna", "Jack",
         "Zoe", "Noah", "Ella", "Omar", "Ruby", "Liam", "Nina", "Ivan", "Kate"]
HE = {"Tom": "he", "Ben": "he", "Leo": "he", "Sam": "he", "Max": "he", "Jack": "he",
      "Noah": "he", "Omar": "he", "Liam": "he", "Ivan": "he"}
ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "shells", "cards",
         "balloons", "stamps", "toy cars", "oranges", "flowers", "coins", "crayons", "eggs"]
BOXES = ["boxes", "bags", "baskets", "jars", "packs", "bowls"]
MULT = {2: "twice", 3: "three times", 4: "four times", 5: "five times"}


def _he(name: str) -> str:
    return HE.get(name, "she")


def add(r: random.Random) -> tuple[str, int, str]:
    n, it, a, b = r.choice(NAMES), r.choice(ITEMS), r.randint(2, 20), r.randint(2, 12)
    he = _he(n)
    q = r.choice([
        f"{n} has {a} {it}. {he.capitalize()} gets {b} more {it}. "
        f"How many {it} does {n} have now?",
        f"{n} had {a} {it} and then found {b} more. How many {it} does {n} have in all?",
    ])
    return q, a + b, f"{n} starts with {a} {it} and gets {b} more.\n{a} + {b} = {a + b}"


def sub(r: random.Random) -> tuple[str, int, str]:
    n, it, b = r.choice(NAMES), r.choice(ITEMS), r.randint(2, 12)
    a = b + r.randint(2, 15)
    he = _he(n)
    q = r.choice([
        f"{n} had {a} {it}. {he.capitalize()} gave {b} {it} to a friend. "
        f"How many {it} does {n} have left?",
        f"{n} has {a} {it} and loses {b} of them. How many {it} are left?",
    ])
    return q, a - b, f"{n} starts with {a} {it} and {b} go away.\n{a} - {b} = {a - b}"


def mul(r: random.Random) -> tuple[str, int, str]:
    n, it, box = r.choice(NAMES), r.choice(ITEMS), r.choice(BOXES)
    a, b = r.randint(2, 9), r.randint(2, 9)
    q = r.choice([
        f"{n} has {a} {box} with {b} {it} in each. How many {it} does {n} have in total?",
        f"There are {a} {box}. Each one holds {b} {it}. How many {it} are there altogether?",
    ])
    return q, a * b, f"There are {a} {box} with {b} {it} each.\n{a} x {b} = {a * b}"


def times(r: random.Random) -> tuple[str, int, str]:
    n, m = r.sample(NAMES, 2)
    it, k, a = r.choice(ITEMS), r.choice(list(MULT)), r.randint(2, 12)
    q = f"{n} has {a} {it}. {m} has {MULT[k]} as many {it} as {n}. How many {it} does {m} have?"
    return q, k * a, f"{m} has {MULT[k]} {a} {it}.\n{k} x {a} = {k * a}"


def two_step(r: random.Random) -> tuple[str, int, str]:
    n, it = r.choice(NAMES), r.choice(ITEMS)
    a, b = r.randint(3, 15), r.randint(2, 10)
    c = r.randint(2, a + b - 1)
    he = _he(n)
    q = (f"{n} had {a} {it}. {he.capitalize()} bought {b} more and then gave away {c}. "
         f"How many {it} does {n} have now?")
    demo = (f"{n} starts with {a} {it} and buys {b} more.\n{a} + {b} = {a + b}\n"
            f"Then {he} gives away {c}.\n{a + b} - {c} = {a + b - c}")
    return q, a + b - c, demo


FAMILIES = {f.__name__: f for f in (add, sub, mul, times, two_step)}


def generate(n: int, seed: int, split: str, exclude: set[str] = frozenset()) -> list[dict]:
    """``n`` records, families in turn, with prompts unique and not in ``exclude``."""
    r, out, seen = random.Random(seed), [], set(exclude)
    names = list(FAMILIES)
    while len(out) < n:
        family = names[len(out) % len(names)]
        prompt, answer, work = FAMILIES[family](r)
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append({"id": f"{split}-{len(out):05d}", "prompt": prompt, "answer": str(answer),
                    "demonstration": f"{work}\nThe answer is {answer}.", "family": family})
    return out


def main() -> None:
    out = Path(__file__).with_suffix("")
    out.mkdir(exist_ok=True)
    test = generate(200, seed=2, split="test")
    train = generate(2000, seed=1, split="train", exclude={x["prompt"] for x in test})
    for split, rows in (("train", train), ("test", test)):
        with open(out / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in rows)


if __name__ == "__main__":
    main()
