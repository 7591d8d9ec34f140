"""What a GC run found and did: per model version and per reason, as values and as JSON-ready dicts."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvstore.storage.s3_batch import DeleteFailure

__all__ = ["REASONS", "GCProgress", "GCReport", "ModelUsage"]

REASONS = {
    "retired": "objects of a retired model version",
    "unknown-model": "objects under a model id with no model record",
    "damaged": "data objects whose header is unreadable, does not match their path or names another codec",
    "unreachable": "chunks whose chain does not lead back to the model's root",
    "stale-tail": "tail markers whose partial chunk is not reachable",
    "temp": "temporary files of interrupted local writes",
    "malformed": "objects under chunks/ that do not follow the layout",
    "evicted": "data objects of reachable chunks evicted as least recently used (--max-bytes / --max-idle)",
}
"""Why an object is garbage (keys of ``GCReport.reasons``)."""


@dataclass(slots=True)
class ModelUsage:
    """Objects and bytes of one model version: kept, freed (or to free, in a dry run), and young garbage.

    ``young_*`` counts garbage still inside the grace period (kept this run).
    """

    label: str
    model_id: str
    status: str
    kept_objects: int = 0
    kept_bytes: int = 0
    freed_objects: int = 0
    freed_bytes: int = 0
    young_objects: int = 0
    young_bytes: int = 0
    evicted_chunks: int = 0
    """Reachable chunks evicted (to evict, in a dry run) as least recently used; counted in ``freed_*`` too."""
    evicted_bytes: int = 0
    last_use: float | None = None
    """Latest use of any of its chunks: access records and data objects' modification times (Unix seconds)."""

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(slots=True)
class GCReport:
    """The summary of one mark-and-sweep run. ``ok`` is false when some deletion failed."""

    url: str
    dry_run: bool
    grace: float
    cutoff: float
    elapsed: float = 0.0
    objects_listed: int = 0
    commits_read: int = 0
    chunks_reachable: int = 0
    by_model: dict[str, ModelUsage] = field(default_factory=dict)
    reasons: Counter[str] = field(default_factory=Counter)
    failures: list[DeleteFailure] = field(default_factory=list)
    failures_total: int = 0
    protected_models: dict[str, str] = field(default_factory=dict)
    max_bytes: int | None = None
    max_idle: float | None = None
    bytes_before_eviction: int | None = None
    """Bytes under chunks/ after the model-version sweep, before eviction (None without eviction)."""
    bytes_after: int | None = None
    budget_met: bool | None = None
    """Whether ``max_bytes`` was reached (None without it); see ``budget_note`` when not."""
    budget_note: str | None = None
    access_records_read: int = 0
    access_records_garbage: int = 0
    """Access records of retired or unknown model versions, or damaged, older than the cutoff."""
    access_records_written: int = 0
    access_records_deleted: int = 0

    def note_use(self, mid: str, when: float) -> None:
        """A use of model ``mid`` (hex) at ``when``: keeps the latest in its ``last_use``."""
        usage = self.by_model.get(mid)
        if usage is not None:
            usage.last_use = when if usage.last_use is None else max(usage.last_use, when)

    @property
    def evicted_chunks(self) -> int:
        return sum(m.evicted_chunks for m in self.by_model.values())

    @property
    def evicted_bytes(self) -> int:
        return sum(m.evicted_bytes for m in self.by_model.values())

    checkpoint: str = ""
    """With a checkpoint file: whether this run resumed an interrupted one, or why it started afresh."""

    @property
    def freed_objects(self) -> int:
        return sum(m.freed_objects for m in self.by_model.values())

    @property
    def freed_bytes(self) -> int:
        return sum(m.freed_bytes for m in self.by_model.values())

    @property
    def kept_objects(self) -> int:
        return sum(m.kept_objects + m.young_objects for m in self.by_model.values())

    @property
    def kept_bytes(self) -> int:
        return sum(m.kept_bytes + m.young_bytes for m in self.by_model.values())

    @property
    def ok(self) -> bool:
        return self.failures_total == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "dry_run": self.dry_run,
            "grace_seconds": self.grace,
            "elapsed_seconds": round(self.elapsed, 3),
            "objects_listed": self.objects_listed,
            "commits_read": self.commits_read,
            "chunks_reachable": self.chunks_reachable,
            "kept_objects": self.kept_objects,
            "kept_bytes": self.kept_bytes,
            "freed_objects": self.freed_objects,
            "freed_bytes": self.freed_bytes,
            "reasons": dict(sorted(self.reasons.items())),
            "models": [m.as_dict() for m in sorted(self.by_model.values(), key=lambda m: m.label)],
            "protected_models": self.protected_models,
            "max_bytes": self.max_bytes,
            "max_idle_seconds": self.max_idle,
            "evicted_chunks": self.evicted_chunks,
            "evicted_bytes": self.evicted_bytes,
            "bytes_before_eviction": self.bytes_before_eviction,
            "bytes_after": self.bytes_after,
            "budget_met": self.budget_met,
            "budget_note": self.budget_note,
            "access_records_read": self.access_records_read,
            "access_records_garbage": self.access_records_garbage,
            "access_records_written": self.access_records_written,
            "access_records_deleted": self.access_records_deleted,
            "delete_failures": self.failures_total,
            "delete_failure_samples": [{"key": f.key, "error": f.error} for f in self.failures],
            "checkpoint": self.checkpoint,
        }


class GCProgress(Protocol):
    """Progress callbacks: phases ``list`` (mark listing), ``read`` (chunk headers), ``sweep``, ``evict``."""

    def start(self, phase: str, total: int | None) -> None: ...

    def advance(self, phase: str, n: int) -> None: ...

    def finish(self, phase: str) -> None: ...
