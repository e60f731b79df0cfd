"""Datasets from files (FileDataset over the datasets library) and the cursor that walks them:
every format, the field mapping, filters, a deterministic shuffle, exact resume mid-pass, and
one clear line for each way a data file can be wrong."""

import json

import pytest

from core.errors import DataError, DataMissing
from orchestrator.data import Arithmetic, Cursor, FileDataset

ROWS = [{"question": f"What is {i} + 2?", "solution": {"steps": f"{i} + 2 = {i + 2}",
                                                       "final": str(i + 2)},
         "level": i % 3, "source": "gen"} for i in range(12)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def jsonl(tmp_path):
    return write_jsonl(tmp_path / "problems.jsonl", ROWS)


FIELDS = {"prompt": "question", "answer": "solution.final",
          "demonstration": "solution.steps", "bucket": "level"}


def test_jsonl_with_a_field_mapping(jsonl):
    ds = FileDataset(path=str(jsonl), fields=FIELDS)
    assert len(ds) == 12
    assert ds[3] == {"id": "problems-3", "prompt": "What is 3 + 2?", "answer": "5",
                     "demonstration": "3 + 2 = 5", "bucket": 0, "level": 0, "source": "gen"}
    assert [r["id"] for r in ds] == [f"problems-{i}" for i in range(12)]


@pytest.mark.parametrize("fmt", ["json", "parquet", "csv", "disk"])
def test_every_format_reads_the_same_records(tmp_path, fmt):
    import datasets

    rows = [{"id": f"q{i}", "prompt": f"{i}+1?", "answer": str(i + 1), "level": i % 2}
            for i in range(5)]
    table = datasets.Dataset.from_list(rows)
    path = tmp_path / {"json": "d.json", "parquet": "d.parquet", "csv": "d.csv",
                       "disk": "saved"}[fmt]
    if fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "parquet":
        table.to_parquet(str(path))
    elif fmt == "csv":
        table.to_csv(str(path), index=False)
    else:
        table.save_to_disk(str(path))
    ds = FileDataset(path=str(path), fields={"id": "id"})
    got = [dict(r, answer=str(r["answer"])) for r in ds]  # CSV reads numbers as numbers
    assert got == rows


def test_chat_messages_as_prompt_and_nested_demonstration(tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "Think."},
                        {"role": "user", "content": f"{i}+1?"}],
             "target": [{"role": "assistant", "content": f"<think>ok</think> {i + 1}"}],
             "reward_model": {"ground_truth": str(i + 1)}} for i in range(3)]
    path = write_jsonl(tmp_path / "luffy.jsonl", rows)
    ds = FileDataset(path=str(path), fields={"answer": "reward_model.ground_truth",
                                             "demonstration": "target.0.content"})
    assert ds[1]["prompt"][1] == {"role": "user", "content": "1+1?"}
    assert ds[1]["answer"] == "2" and ds[1]["demonstration"] == "<think>ok</think> 2"
    assert "target" not in ds[1] and "reward_model" not in ds[1]


def test_default_fields_are_read_when_present_and_null_ignores_a_column(tmp_path):
    import datetime

    rows = [{"id": f"u{i}", "prompt": f"{i}?", "answer": i, "demonstration": f"= {i}",
             "when": datetime.date(2026, 1, i + 1)} for i in range(3)]
    path = tmp_path / "d.parquet"
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(path))
    ds = FileDataset(path=str(path))
    assert ds[2] == {"id": "u2", "prompt": "2?", "answer": 2, "demonstration": "= 2",
                     "when": "2026-01-03"}  # a date as JSON keeps it: records go into checkpoints
    json.dumps(list(ds))
    bare = FileDataset(path=str(path), fields={"demonstration": None, "id": None})
    assert bare[0] == {"id": "d-0", "prompt": "0?", "answer": 0, "when": "2026-01-01"}
    assert ds.by_id("u1") == ds[1] and ds.by_id("nope") is None


def test_where_filter_and_limit(jsonl, tmp_path, monkeypatch):
    ds = FileDataset(path=str(jsonl), fields=FIELDS, where={"bucket": [0, 1]})
    assert {r["bucket"] for r in ds} == {0, 1} and len(ds) == 8
    by_column = FileDataset(path=str(jsonl), fields=FIELDS, where={"level": [0, 1]})
    assert [r["id"] for r in by_column] == [r["id"] for r in ds]
    (tmp_path / "my_filters.py").write_text(
        "def even(record):\n    return int(record['answer']) % 2 == 0\n")
    monkeypatch.chdir(tmp_path)
    ds = FileDataset(path=str(jsonl), fields=FIELDS, filter="my_filters:even", limit=3)
    assert [r["answer"] for r in ds] == ["2", "4", "6"]


@pytest.mark.parametrize("setup, expected", [
    (lambda p: None, "no such file or folder"),
    (lambda p: p.write_text(""), "could not be read as json"),
    (lambda p: write_jsonl(p, [{"question": "q", "final": 1}]),
     "no column 'solution' for fields.answer (columns: final, question)"),
    (lambda p: write_jsonl(p, [{"question": "q", "solution": {"final": "1"}},
                               {"solution": {"final": "2"}}]),
     "record 1 has no 'question' (fields.prompt)"),
    (lambda p: write_jsonl(p, [{"question": "", "solution": {"final": "1"}}]),
     "record 0: 'question' (fields.prompt) is neither text nor a list of chat messages"),
])
def test_bad_files_fail_with_one_line_naming_file_and_field(tmp_path, setup, expected):
    path = tmp_path / "bad.jsonl"
    setup(path)
    with pytest.raises(DataError) as err:
        FileDataset(path=str(path), fields={"prompt": "question", "answer": "solution.final"})
    msg = str(err.value)
    assert str(path) in msg and expected in msg, msg
    assert "\n" not in msg


def test_duplicate_ids_and_missing_demonstrations_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "prompt": "p", "answer": "1"}] * 2)
    with pytest.raises(DataError, match="id 'a' is not unique"):
        FileDataset(path=str(path), fields={"id": "id"})
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "p", "answer": "1", "sol": None}])
    with pytest.raises(DataError, match="no record has a demonstration in column 'sol'"):
        FileDataset(path=str(path), fields={"demonstration": "sol"})


def test_cursor_shuffles_deterministically_and_resumes_exactly_mid_pass(jsonl):
    ds = FileDataset(path=str(jsonl), fields=FIELDS)

    def ids(batch):
        return [r["id"] for r in batch]

    straight = Cursor(ds, seed=3)
    batches = [ids(straight.next_batch(5)) for _ in range(6)]  # 30 records: 2.5 passes
    assert sorted(batches[0] + batches[1] + batches[2][:2]) == sorted(r["id"] for r in ds)
    assert batches[:2] != [[f"problems-{i}" for i in range(5)],
                           [f"problems-{i}" for i in range(5, 10)]]  # shuffled
    assert ids(Cursor(ds, seed=3).next_batch(5)) == batches[0]  # deterministic
    first = Cursor(ds, seed=3)
    for _ in range(3):
        first.next_batch(5)
    state = json.loads(json.dumps(first.state()))  # as a checkpoint stores it
    assert state["epoch"] == 1 and 0 < state["offset"] < 12  # mid-pass
    resumed = Cursor(ds, seed=3)
    resumed.load_state(state)
    assert [ids(resumed.next_batch(5)) for _ in range(3)] == batches[3:]


def test_cursor_skips_and_counts_records_that_do_not_fit(jsonl):
    ds = FileDataset(path=str(jsonl), fields=FIELDS)
    cursor = Cursor(ds, seed=0, keep=lambda r: r["bucket"] != 2)
    got = [r for _ in range(4) for r in cursor.next_batch(4)]
    assert all(r["bucket"] != 2 for r in got)
    consumed = cursor.epoch * len(ds) + cursor.offset
    assert cursor.skipped == consumed - 16 > 0
    never = Cursor(ds, seed=0, keep=lambda r: False)
    with pytest.raises(ValueError, match="12 records in a row were skipped"):
        never.next_batch(1)


def test_cursor_on_a_fixed_list_keeps_its_order_across_versions():
    """The shuffle of a finite dataset without __getitem__ (Arithmetic with a size) is the
    permutation the earlier cursor produced: same seed, same order."""
    import random

    ds = Arithmetic(digits=[1, 2], size=10, seed=4)
    records = list(ds)
    random.Random(7).shuffle(records)
    assert Cursor(ds, seed=7).next_batch(10) == records


def test_subtraction_family():
    recs = list(Arithmetic(op="-", digits=[1, 3], size=200, seed=3, pad=True, width=4))
    for r in recs:
        a, b = map(int, r["prompt"][:-1].split("-"))
        assert a >= b > 0 and int(r["answer"]) == a - b and len(r["answer"]) == 5
        assert r["demonstration"] == r["answer"][::-1]


def _mixture(**over):
    from orchestrator.data import Mixture

    parts = [{"name": "add", "cls": "orchestrator.data:Arithmetic",
              "args": {"digits": [1, 2], "size": 6, "seed": 1}},
             {"name": "sub", "cls": "orchestrator.data:Arithmetic",
              "args": {"op": "-", "digits": [1, 2], "size": 4, "seed": 1}}]
    for i, p in over.pop("parts", {}).items():
        parts[i] |= p
    return Mixture(parts=parts, **over)


def test_mixture_concatenates_finite_parts_and_tags_their_family():
    mix = _mixture()
    recs = list(mix)
    assert len(mix) == len(recs) == 10
    assert [r["family"] for r in recs] == ["add"] * 6 + ["sub"] * 4
    assert len({r["id"] for r in recs}) == 10  # both parts' ids were arith-1-0..: now prefixed
    assert all("-" in r["prompt"] for r in recs[6:])
    assert len(Cursor(mix, seed=0).next_batch(10)) == 10


@pytest.mark.parametrize("infinite", [True, False])
def test_mixture_streams_by_weight_and_restarts_finite_parts(infinite):
    import itertools

    args = {"digits": [1, 2], "seed": 1} | ({} if infinite else {"size": 50})
    mix = _mixture(parts={0: {"args": args, "weight": 3.0}}, seed=5)
    with pytest.raises(TypeError, match="no length"):
        len(mix)
    recs = list(itertools.islice(mix, 800))
    assert recs == list(itertools.islice(mix, 800))  # seeded: every pass is the same stream
    share = sum(r["family"] == "add" for r in recs) / len(recs)
    assert 0.7 < share < 0.8  # 3:1
    subs = [r["id"] for r in recs if r["family"] == "sub"]
    assert len(set(subs)) == 4 and len(subs) > 4  # the 4-record part started again
    passes = [subs[i:i + 4] for i in range(0, 40, 4)]
    assert all(sorted(p) == sorted(passes[0]) for p in passes)  # each pass: every record once
    assert len({tuple(p) for p in passes}) > 1                  # in a new order


def test_mixture_errors_name_the_part():
    import itertools

    from orchestrator.data import Mixture

    with pytest.raises(ValueError, match="a weight means nothing"):
        _mixture(parts={1: {"weight": 2.0}}, stream=False)
    with pytest.raises(ValueError, match="add never ends"):
        _mixture(parts={0: {"args": {}}}, stream=False)
    assert len(list(itertools.islice(_mixture(stream=True), 30))) == 30
    with pytest.raises(ValueError, match=r"parts\[1\] \(sub, orchestrator.data:Arithmetic\)"):
        _mixture(parts={1: {"args": {"op": "*"}}})
    with pytest.raises(ValueError, match="part names must differ"):
        _mixture(parts={1: {"name": "add"}})
    with pytest.raises(Exception, match="nowhere"):
        Mixture(parts=[{"name": "x", "cls": "nowhere.mod:Data"}])
    with pytest.raises(DataMissing, match=r"parts\[1\] \(sub, orchestrator.data:FileDataset\)"):
        _mixture(parts={1: {"cls": "orchestrator.data:FileDataset",
                            "args": {"path": "/nonexistent/x.jsonl"}}})
    with pytest.raises(ValueError, match="part sub has no records"):
        _mixture(parts={1: {"cls": "tests.orchestrator.test_data:_Empty", "args": {}}})


class _Empty:
    def __iter__(self):
        return iter(())

    def __len__(self):
        return 0


def test_negative_subtraction_family():
    recs = list(Arithmetic(op="-", negative=True, digits=[1, 3], size=300, seed=3, pad=True,
                           width=3, operands_reversed=True))
    for r in recs:
        a, b = (int(x[::-1]) for x in r["prompt"][:-1].split("-"))
        assert 0 < a < b and r["answer"] == "-" + f"{b - a:04d}" and len(r["prompt"]) == 8
        assert r["demonstration"] == r["answer"][::-1] and r["demonstration"].endswith("-")
        assert r["digits"] == len(str(b))
    ones = [r for r in recs if r["digits"] == 1]  # 8 of the 36 pairs a < b <= 9 differ by 1
    assert sum(r["answer"] == "-0001" for r in ones) < 0.35 * len(ones)  # no pile-up there
    with pytest.raises(ValueError, match="negative answers need op"):
        Arithmetic(negative=True)
