"""How likely a policy finds each token of a dataset's demonstrations: the median and max
probability, position by position, of the demonstration's tokens (and EOS) given the prompt
and the tokens before — what decides whether sampling can ever produce them, and how much
gradient LUFFY's shaped term p/(p+gamma) leaves them (docs/experiments.md, study 2).

    .venv/bin/python benchmarks/token_probs.py runs/repro/hidden-base/checkpoints/final \\
        recipes/repro/hidden.yaml --split eval --family sub --limit 200
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("policy", help="a Hugging Face folder")
    ap.add_argument("recipe", help="the recipe whose data to read")
    ap.add_argument("--split", choices=["train", "eval"], default="eval")
    ap.add_argument("--family", help="only records of this family (a Mixture's part)")
    ap.add_argument("--limit", type=int, default=200)
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.config import load_recipe
    from orchestrator.setup import build_dataset

    recipe = load_recipe(a.recipe)
    data = build_dataset(getattr(recipe.data, a.split), f"data.{a.split}")
    records = []
    for r in data:
        if a.family is None or r.get("family") == a.family:
            records.append(r)
        if len(records) == a.limit:
            break
    tok = AutoTokenizer.from_pretrained(a.policy)
    model = AutoModelForCausalLM.from_pretrained(a.policy).eval()
    per_position: list[list[float]] = []
    for r in records:
        prompt = tok(r["prompt"]).input_ids
        completion = tok(r["demonstration"], add_special_tokens=False).input_ids + \
            [tok.eos_token_id]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        for j, t in enumerate(completion):
            if j == len(per_position):
                per_position.append([])
            per_position[j].append(float(logp[len(prompt) + j - 1, t]))
    print(f"{len(records)} demonstrations of {a.split}"
          + (f" (family {a.family})" if a.family else ""))
    print("position  median p   max p")
    for j, lps in enumerate(per_position):
        print(f"{j:>8}  {math.exp(statistics.median(lps)):.1e}  {math.exp(max(lps)):.1e}")


if __name__ == "__main__":
    main()
