"""Counts of one part of a GC run (a partition, a delete batch), added to the report once that part is final.

A resumable run must count every object once across its interruptions: a
partition's counts join the report (and the checkpoint) only when the whole
partition is done, and the objects of a delete batch the moment the batch is
deleted (a resumed run does not list them again).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvstore.gc.report import GCReport, ModelUsage
from kvstore.storage.s3_batch import DeleteFailure

__all__ = ["MAX_FAILURE_SAMPLES", "Tally"]

MAX_FAILURE_SAMPLES = 100
_FIELDS = ("kept_objects", "kept_bytes", "freed_objects", "freed_bytes", "young_objects", "young_bytes")


@dataclass(slots=True)
class Tally:
    """Objects and bytes per model id and outcome (``kept`` / ``freed`` / ``young``), reasons, failed deletions."""

    models: dict[str, list[int]] = field(default_factory=dict)
    reasons: Counter[str] = field(default_factory=Counter)
    failures: list[DeleteFailure] = field(default_factory=list)
    failures_total: int = 0

    def count(self, mid: str, outcome: str, size: int) -> None:
        row = self.models.get(mid)
        if row is None:
            row = self.models[mid] = [0] * len(_FIELDS)
        i = _FIELDS.index(f"{outcome}_objects")
        row[i] += 1
        row[i + 1] += size

    def failed(self, failures: list[DeleteFailure]) -> None:
        self.failures_total += len(failures)
        room = MAX_FAILURE_SAMPLES - len(self.failures)
        self.failures.extend(failures[: max(room, 0)])

    def add_to(self, report: GCReport, usage: Callable[[str], ModelUsage]) -> None:
        """Add these counts to ``report``; ``usage(mid)`` gives (creating it if need be) a model's row."""
        for mid, row in self.models.items():
            u = usage(mid)
            for name, n in zip(_FIELDS, row, strict=True):
                setattr(u, name, getattr(u, name) + n)
        report.reasons.update(self.reasons)
        report.failures_total += self.failures_total
        room = MAX_FAILURE_SAMPLES - len(report.failures)
        report.failures.extend(self.failures[: max(room, 0)])

    def to_obj(self) -> dict[str, Any]:
        return {
            "models": self.models,
            "reasons": dict(self.reasons),
            "failures": [[f.key, f.error] for f in self.failures],
            "failures_total": self.failures_total,
        }

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> Tally:
        return cls(
            {str(mid): [int(n) for n in row] for mid, row in obj["models"].items()},
            Counter({str(r): int(n) for r, n in obj["reasons"].items()}),
            [DeleteFailure(str(k), str(e)) for k, e in obj["failures"]],
            int(obj["failures_total"]),
        )
