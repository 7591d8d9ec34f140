"""Prometheus metrics of a store (install the ``metrics`` extra: ``pip install 'kvstore[metrics]'``).

    from prometheus_client import REGISTRY
    REGISTRY.register(kvstore.metrics.StoreCollector(store))   # in your own exporter
    server = kvstore.metrics.serve(store, port=9464)            # or a port of its own; server.close()

The README's "Metrics" section lists every metric. ``import kvstore`` never
imports this package (nor prometheus_client).
"""

from __future__ import annotations

try:
    import prometheus_client  # noqa: F401 - fail here, with the extra to install, not deep inside
except ImportError as exc:  # pragma: no cover - the test environment has the extra
    raise ImportError("kvstore.metrics needs prometheus-client: pip install 'kvstore[metrics]'") from exc

from kvstore.metrics.collector import StatsSource, StoreCollector
from kvstore.metrics.gc_file import GCReportCollector, write_gc_metrics
from kvstore.metrics.server import MetricsServer, serve

__all__ = ["GCReportCollector", "MetricsServer", "StatsSource", "StoreCollector", "serve", "write_gc_metrics"]
