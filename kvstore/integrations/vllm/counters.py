"""The connector's counters: what it looked up, loaded, saved and lost, per engine (no vLLM import here)."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, fields

__all__ = ["ConnectorCounters", "Counts"]


@dataclass(slots=True)
class Counts:
    """Totals over an interval (or since start). Seconds are wall time spent waiting on the store."""

    lookups: int = 0
    """Requests the scheduler looked up in the store."""
    lookup_hits: int = 0
    hit_tokens: int = 0
    """Tokens vLLM was told it can load (beyond its own prefix cache)."""
    lookup_failures: int = 0
    """Lookups that met an unreachable store or its deadline (answered as misses)."""
    lookup_seconds: float = 0.0
    """Wall time from a lookup's start to its answer (hit, miss or failure), summed over lookups."""
    loads: int = 0
    load_bytes: int = 0
    load_seconds: float = 0.0
    load_errors: int = 0
    """Loads cut short (damaged chunk, store failure, deadline): their blocks were reported for recompute."""
    load_error_blocks: int = 0
    saves: int = 0
    save_bytes: int = 0
    """Bytes uploaded (chunks the store already had are skipped and not counted)."""
    save_seconds: float = 0.0
    save_errors: int = 0
    saves_dropped: int = 0
    """Saves skipped because ``save_budget_bytes`` of earlier saves were still in flight."""

    def add(self, other: Counts) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, int | float]:
        return asdict(self)

    def is_empty(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self))


class ConnectorCounters:
    """Counters updated from vLLM's threads and the store's loop thread: totals and the interval since the last take."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._interval = Counts()
        self._total = Counts()

    def add(self, **deltas: int | float) -> None:
        """Add to named counters (``lookups=1, hit_tokens=512``)."""
        with self._lock:
            for name, delta in deltas.items():
                for counts in (self._interval, self._total):
                    setattr(counts, name, getattr(counts, name) + delta)

    def take_interval(self) -> Counts:
        """The counts since the previous call (what vLLM's stats and Prometheus hooks report)."""
        with self._lock:
            out, self._interval = self._interval, Counts()
        return out

    def totals(self) -> Counts:
        with self._lock:
            return Counts(**asdict(self._total))
