"""``serve``: a store's metrics on an HTTP port for Prometheus to scrape, in a daemon thread."""

from __future__ import annotations

import threading
from types import TracebackType
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from kvstore.metrics.collector import StatsSource, StoreCollector

__all__ = ["MetricsServer", "serve"]


class MetricsServer:
    """A running exporter: ``port`` is the bound port (useful after ``port=0``); ``close()`` stops it."""

    def __init__(
        self,
        httpd: WSGIServer,
        thread: threading.Thread,
        registry: CollectorRegistry,
        collector: StoreCollector | None,
        host: str,
    ) -> None:
        self._httpd = httpd
        self._thread = thread
        self._collector = collector
        self.registry = registry
        self.host = host
        self.port: int = httpd.server_address[1]

    @property
    def url(self) -> str:
        """The URL to scrape (any path answers with the metrics)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving, release the port and take the store's collector out of the registry. Idempotent."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()
        collector, self._collector = self._collector, None
        if collector is not None:
            self.registry.unregister(collector)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def serve(
    store: StatsSource, port: int, *, host: str = "127.0.0.1", registry: CollectorRegistry | None = None
) -> MetricsServer:
    """Serve ``store``'s metrics at ``http://host:port/metrics`` until ``close()``; ``port=0`` picks a free port.

    The default ``host`` keeps the exporter on this machine; pass ``"0.0.0.0"``
    for a Prometheus elsewhere. With ``registry`` the store's collector is added
    to it and the whole registry is served (your own metrics beside the store's);
    otherwise a registry of its own, so the process-wide default is left alone.
    """
    if registry is None:
        registry = CollectorRegistry()
    collector = StoreCollector(store)
    registry.register(collector)
    try:
        httpd, thread = start_http_server(port, addr=host, registry=registry)
    except BaseException:
        registry.unregister(collector)
        raise
    return MetricsServer(httpd, thread, registry, collector, host)
