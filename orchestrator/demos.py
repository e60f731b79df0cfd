"""Demonstrations: a store keyed by prompt id, with a budget on how many are used.

Filled from the dataset's ``demonstration`` field as batches go by. ``take`` hands out the
demonstrations of the asked ids and counts each distinct demonstration once; when the budget
(``data.demo_budget``) is spent, only already-used demonstrations are handed out again.
"""

from __future__ import annotations


class DemoStore:
    def __init__(self, budget: int | None = None):
        self.budget = budget
        self.records: dict[str, dict] = {}
        self.used: list[str] = []        # order of first use, for the checkpoint
        self._used: set[str] = set()
        self.refused = 0                  # asked for past the budget

    def add(self, records: list[dict]) -> None:
        for r in records:
            if r.get("demonstration"):
                self.records.setdefault(r["id"], r)

    def has(self, pid: str) -> bool:
        return pid in self.records

    def take(self, ids, peek: bool = False) -> list[dict]:
        """The demonstrations of ``ids`` that the budget allows; ``peek`` (a probe) neither
        counts them as used nor is limited by the budget: it trains on nothing."""
        if peek:
            return [self.records[pid] for pid in ids if pid in self.records]
        out = []
        for pid in ids:
            rec = self.records.get(pid)
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
