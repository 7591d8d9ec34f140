"""A GC run's results in the Prometheus text format, for a cron job's node-exporter textfile collector."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, write_to_textfile
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvstore.gc.report import REASONS, GCReport

__all__ = ["GCReportCollector", "write_gc_metrics"]


class GCReportCollector(Collector):
    """The figures of one finished ``GCReport``, every sample labelled with the store's URL.

    All are gauges: each run replaces the file, so they describe the last run
    (``kvstore_gc_last_run_timestamp_seconds`` says when).
    """

    def __init__(self, report: GCReport, finished: float | None = None) -> None:
        self._report = report
        self._finished = time.time() if finished is None else finished

    def collect(self) -> Iterator[Metric]:
        rep, url = self._report, self._report.url

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=["store"])
            family.add_metric([url], value)
            return family

        def per_model(name: str, doc: str, attr: str) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=["store", "model", "status"])
            for m in sorted(rep.by_model.values(), key=lambda m: m.label):
                family.add_metric([url, m.label, m.status], getattr(m, attr))
            return family

        yield gauge("kvstore_gc_last_run_timestamp_seconds", "When the last GC run ended (Unix time).", self._finished)
        yield gauge("kvstore_gc_dry_run", "1 when the last run was a dry run (nothing deleted), else 0.", rep.dry_run)
        yield gauge("kvstore_gc_success", "1 when every deletion of the last run succeeded, else 0.", rep.ok)
        yield gauge("kvstore_gc_duration_seconds", "How long the last run took.", rep.elapsed)
        yield gauge("kvstore_gc_grace_seconds", "The grace period of the last run.", rep.grace)
        yield gauge("kvstore_gc_objects_listed", "Objects the last run listed.", rep.objects_listed)
        yield gauge("kvstore_gc_commits_read", "Commit records the last run read.", rep.commits_read)
        yield gauge("kvstore_gc_chunks_reachable", "Chunks a live model version reaches.", rep.chunks_reachable)
        yield gauge("kvstore_gc_delete_failures", "Objects the last run could not delete.", rep.failures_total)
        yield per_model("kvstore_gc_kept_objects", "Objects kept as reachable, by model version.", "kept_objects")
        yield per_model("kvstore_gc_kept_bytes", "Bytes kept as reachable, by model version.", "kept_bytes")
        yield per_model(
            "kvstore_gc_freed_objects", "Objects deleted (to delete, in a dry run), by model version.", "freed_objects"
        )
        yield per_model(
            "kvstore_gc_freed_bytes", "Bytes deleted (to delete, in a dry run), by model version.", "freed_bytes"
        )
        yield per_model(
            "kvstore_gc_young_objects", "Garbage objects kept because they are within the grace.", "young_objects"
        )
        yield per_model(
            "kvstore_gc_evicted_chunks",
            "Reachable chunks evicted as least recently used (to evict, in a dry run), by model version.",
            "evicted_chunks",
        )
        yield per_model("kvstore_gc_evicted_bytes", "Bytes of the chunks evicted, by model version.", "evicted_bytes")
        yield gauge(
            "kvstore_gc_budget_met",
            "0 when --max-bytes could not be met (what is left was used within the grace), else 1.",
            rep.budget_met is not False,
        )
        garbage = GaugeMetricFamily(
            "kvstore_gc_garbage_objects",
            "Garbage objects found, by reason (see kvstore.gc.REASONS).",
            labels=["store", "reason"],
        )
        for reason in sorted(REASONS):
            garbage.add_metric([url, reason], rep.reasons.get(reason, 0))
        yield garbage


def write_gc_metrics(path: str | os.PathLike[str], report: GCReport) -> None:
    """Write ``report`` to ``path`` atomically (a temporary file renamed over it), as node exporter expects.

    Name the file ``*.prom`` inside the textfile collector's directory.
    """
    registry = CollectorRegistry()
    registry.register(GCReportCollector(report))
    write_to_textfile(os.fspath(path), registry)
