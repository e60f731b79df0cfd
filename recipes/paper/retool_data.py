"""Stage the data of recipes/paper/retool7b_sft_rl.yaml: ReTool's cold-start traces, its RL
prompts and its validation problems, as braid records (docs/paper_recipes.md, "ReTool").

Follows verl's ReTool recipe (volcengine/verl@ea56e9ac, recipe/retool/): the traces are cut into
messages as ``retool_sft_preprocess.py`` cuts them — ``<code>`` an assistant turn calling the
tool, ``<interpreter>`` the tool's reply, ``<answer>`` the final assistant turn — and the RL and
validation prompts end with the answer format ``retool.py`` appends. Three JSON-lines files, each
record ``{prompt, answer, ...}``:

- ``retool_sft.jsonl``: JoeYing/ReTool-SFT — ``prompt`` the question, ``demonstration`` the
  messages after it, ``answer`` the trace's last ``\\boxed{}`` (for the RL phase).
- ``dapo_math_17k.jsonl``: BytedTsinghua-SIA/DAPO-Math-17k, one record per distinct prompt.
- ``aime_2024_2025.jsonl``: Maxwell-Jia/AIME_2024 and yentinglin/aime_2025, ``data_source``
  ``aime_2024`` / ``aime_2025``.

Each tool call is written as the text Qwen2.5's chat template renders for a ``tool_calls`` entry
(``<tool_call>\\n{"name": "python", "arguments": {"code": ...}}\\n</tool_call>``), naming braid's
``python`` tool rather than verl's ``code_interpreter``: the policy learns to call the tool the
RL phase offers. Run from the repository root on the folders ``hf download`` wrote:

    python recipes/paper/retool_data.py --sft /mnt/braid/data/ReTool-SFT \\
        --dapo /mnt/braid/data/DAPO-Math-17k --aime24 /mnt/braid/data/AIME_2024 \\
        --aime25 /mnt/braid/data/aime_2025 --out /mnt/braid/data/retool
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

# recipe/retool/retool.py: appended to every RL and validation prompt
ANSWER_FORMAT = "\nThe answer format must be: \\boxed{'The final answer goes here.'}"
TOOL = "python"  # braid's workers.agent.tools:python (verl's tool is code_interpreter)
_CODE = re.compile(r"```python(.*?)```", re.DOTALL)


def tool_call_text(code: str) -> str:
    """A call as Qwen2.5's template renders ``tool_calls`` (arguments through ``tojson``)."""
    call = {"name": TOOL, "arguments": {"code": code}}
    return "<tool_call>\n" + json.dumps(call, ensure_ascii=False) + "\n</tool_call>"


def _cut(content: str, start: str, stop: str) -> tuple[int, int] | None:
    i = content.find(start)
    if i == -1:
        return None
    j = content.find(stop)
    if j < i:
        raise ValueError(f"{start} without a following {stop}")
    return i, j


def sft_record(row: dict) -> dict:
    r"""One ReTool-SFT row as a braid record (retool_sft_preprocess.py's ``process``).

    >>> row = {"messages": [
    ...     {"role": "user", "content": "Solve. *user question:* What is 2^10? <answer></answer>"},
    ...     {"role": "assistant", "content": "Compute it.<code>```python\nprint(2**10)\n```"
    ...      "</code><interpreter>1024</interpreter>So <answer>\\boxed{1024}</answer>"}]}
    >>> rec = sft_record(row)
    >>> rec["prompt"], rec["answer"], [m["role"] for m in rec["demonstration"]]
    ('What is 2^10?', '1024', ['assistant', 'tool', 'assistant'])
    >>> print(rec["demonstration"][0]["content"])
    Compute it.
    <tool_call>
    {"name": "python", "arguments": {"code": "print(2**10)"}}
    </tool_call>
    >>> rec["demonstration"][2]["content"]
    'So \\boxed{1024}'
    """
    from rewards.math import _last_boxed

    question = row["messages"][0]["content"]
    mark = "*user question:*"
    if mark not in question:
        raise ValueError(f"no {mark!r} in the user message")
    prompt = question[question.find(mark) + len(mark):]
    prompt = prompt.replace("<answer>", "").replace("</answer>", "").strip()
    content, demo, role = row["messages"][1]["content"], [], "assistant"
    while content:
        if role == "assistant":
            code = _cut(content, "<code>", "</code>")
            if code:
                i, j = code
                body = content[i + len("<code>"):j]
                found = _CODE.findall(body)
                body = found[0].strip() if found else body
                text = content[:i].strip()
                demo.append({"role": "assistant", "content":
                             (text + "\n" if text else "") + tool_call_text(body)})
                content = content[j + len("</code>"):]
            else:
                ans = _cut(content, "<answer>", "</answer>")
                if ans is None:
                    raise ValueError("an assistant turn with neither <code> nor <answer>")
                i, j = ans
                text = content[:i] + content[i + len("<answer>"):j]
                demo.append({"role": "assistant", "content": text.strip()})
                content = content[j + len("</answer>"):]
            role = "tool"
        else:
            out = _cut(content, "<interpreter>", "</interpreter>")
            if out is None:
                raise ValueError("a tool call without an <interpreter> reply")
            i, j = out
            demo.append({"role": "tool", "content": content[i + len("<interpreter>"):j].strip()})
            content = content[j + len("</interpreter>"):]
            role = "assistant"
    if not demo or demo[-1]["role"] != "assistant":
        raise ValueError("the trace does not end with an answer")
    answer = _last_boxed(demo[-1]["content"])
    if not answer:
        raise ValueError("no \\boxed{} answer in the final turn")
    return {"prompt": prompt, "answer": answer.strip(), "demonstration": demo}


def dapo_record(row: dict) -> dict:
    """A DAPO-Math-17k row as retool.py's ``map_fn2`` leaves it: the answer format appended."""
    return {"prompt": row["prompt"][0]["content"] + ANSWER_FORMAT,
            "answer": str(row["reward_model"]["ground_truth"]),
            "data_source": row.get("data_source") or "math_dapo"}


def aime_record(row: dict, source: str) -> dict:
    """An AIME row as retool.py's ``map_fn`` writes it."""
    problem, answer = (row["Problem"], row["Answer"]) if source == "aime_2024" else \
        (row["problem"], row["answer"])
    return {"prompt": problem + ANSWER_FORMAT, "answer": str(answer), "data_source": source}


def _rows(path: str):
    import datasets

    return datasets.load_dataset(path, split="train")


def _write(path: Path, records) -> int:
    n = 0
    with path.open("w") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("sft", "dapo", "aime24", "aime25", "out"):
        p.add_argument(f"--{name}", required=True)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    sft, skipped = [], 0
    for row in _rows(a.sft):
        try:
            sft.append(sft_record(row))
        except ValueError:
            skipped += 1
    print(f"retool_sft.jsonl: {_write(out / 'retool_sft.jsonl', sft)} traces "
          f"({skipped} left out: not cut into turns, or no boxed answer)")
    seen, dapo = set(), []
    for row in _rows(a.dapo):
        rec = dapo_record(row)
        if rec["prompt"] not in seen:
            seen.add(rec["prompt"])
            dapo.append(rec)
    print(f"dapo_math_17k.jsonl: {_write(out / 'dapo_math_17k.jsonl', dapo)} distinct prompts")
    aime = [aime_record(r, "aime_2024") for r in _rows(a.aime24)] + \
        [aime_record(r, "aime_2025") for r in _rows(a.aime25)]
    print(f"aime_2024_2025.jsonl: {_write(out / 'aime_2024_2025.jsonl', aime)} problems")


if __name__ == "__main__":
    main()
