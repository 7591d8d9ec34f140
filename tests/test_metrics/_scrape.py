"""Parse the Prometheus text format (with prometheus_client's own parser) into what tests compare."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def exposition(collector: Collector) -> str:
    """What a scrape of a registry holding only ``collector`` returns."""
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def samples(text: str) -> Samples:
    """Every sample of ``text``: (sample name, labels) -> value."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def families(text: str) -> dict[str, str]:
    """Metric name as documented (counters with ``_total``) -> type."""
    return {f.name + "_total" if f.type == "counter" else f.name: f.type for f in text_string_to_metric_families(text)}


def value(all_samples: Samples, name: str, **labels: str) -> float:
    return all_samples[(name, frozenset(labels.items()))]
