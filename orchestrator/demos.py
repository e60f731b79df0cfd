"""Demonstrations: a store keyed by prompt id, with a budget on how many are used.

Filled from the dataset's ``demonstration`` field as batches go by (and by a teacher).
``take`` hands out the demonstrations of the asked ids and counts each distinct demonstration
once; when the budget (``data.demo_budget``) is spent, only already-used demonstrations are
handed out again.

With a ``lookup`` (a dataset's ``by_id``, as ``FileDataset`` has), the store keeps only the ids
of the dataset's demonstrations and fetches the records when they are taken: a pass over 46k
problems with 8k-token solutions would otherwise sit in memory and in every checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable


class DemoStore:
    def __init__(self, budget: int | None = None,
                 lookup: Callable[[str], dict | None] | None = None):
        self.budget, self.lookup = budget, lookup
        self.records: dict[str, dict | None] = {}  # None: the dataset's, fetched by id
        self.used: list[str] = []        # order of first use, for the checkpoint
        self._used: set[str] = set()
        self.refused = 0                  # asked for past the budget

    def add(self, records: list[dict], owned: bool = False) -> None:
        """Remember the demonstrations of these records; ``owned``: they are not the
        dataset's (a teacher wrote them), so the store keeps them whole."""
        for r in records:
            if r.get("demonstration") and r["id"] not in self.records:
                self.records[r["id"]] = r if owned or self.lookup is None else None

    def has(self, pid: str) -> bool:
        return pid in self.records

    def _get(self, pid: str) -> dict | None:
        rec = self.records.get(pid)
        if rec is None and pid in self.records:
            rec = self.lookup(pid)
        return rec

    def take(self, ids, peek: bool = False) -> list[dict]:
        """The demonstrations of ``ids`` that the budget allows; ``peek`` (a probe) neither
        counts them as used nor is limited by the budget: it trains on nothing."""
        if peek:
            return [rec for pid in ids if (rec := self._get(pid)) is not None]
        out = []
        for pid in ids:
            rec = self._get(pid)
            if rec is None:
                continue
            if pid not in self._used:
                if self.budget is not None and len(self.used) >= self.budget:
                    self.refused += 1
                    continue
                self._used.add(pid)
                self.used.append(pid)
            out.append(rec)
        return out

    def metrics(self) -> dict[str, float]:
        return {"demos/used": float(len(self.used)), "demos/refused": float(self.refused),
                "demos/known": float(len(self.records))}

    def state_dict(self) -> dict:
        return {"records": self.records, "used": self.used, "refused": self.refused}

    def load_state_dict(self, state: dict) -> None:
        self.records = dict(state["records"])
        self.used = list(state["used"])
        self._used = set(self.used)
        self.refused = int(state.get("refused", 0))
