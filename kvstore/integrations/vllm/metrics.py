"""The counters in vLLM's connector stats (logged with the engine's metrics) and its Prometheus hooks."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from kvstore.integrations.vllm.counters import Counts

__all__ = ["KVStoreConnectorStats", "KVStorePromMetrics"]


@dataclass
class KVStoreConnectorStats(KVConnectorStats):  # type: ignore[misc]  # vLLM is untyped here
    """One interval's ``Counts`` as a plain dict (it crosses process boundaries)."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = Counts().as_dict()

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name, value in other.data.items():
            self.data[name] = self.data.get(name, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = dict(self.data)
        if self.data.get("load_seconds"):
            out["load_gb_per_s"] = round(self.data["load_bytes"] / self.data["load_seconds"] / 1e9, 3)
        if self.data.get("save_seconds"):
            out["save_gb_per_s"] = round(self.data["save_bytes"] / self.data["save_seconds"] / 1e9, 3)
        return out

    def is_empty(self) -> bool:
        return not any(self.data.values())


_DOCS = {f.name: f"kvstore connector: {f.name.replace('_', ' ')}" for f in fields(Counts)}


class KVStorePromMetrics(KVConnectorPromMetrics):  # type: ignore[misc]  # vLLM is untyped here
    """One Prometheus counter per ``Counts`` field, ``vllm:kvstore_<field>``, labelled per engine."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters: dict[tuple[int, str], Any] = {}
        for name, doc in _DOCS.items():
            counter = self._counter_cls(name=f"vllm:kvstore_{name}", documentation=doc, labelnames=labelnames)
            for engine, values in per_engine_labelvalues.items():
                self._counters[engine, name] = counter.labels(*values)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, value in transfer_stats_data.items():
            counter = self._counters.get((engine_idx, name))
            if counter is not None and value:
                counter.inc(value)
