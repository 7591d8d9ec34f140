"""The README's "Metrics" tables list exactly the metrics a scrape and a GC metrics file contain."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from _scrape import exposition, families

import kvstore
from kvstore.gc import run_gc
from kvstore.metrics import GCReportCollector, StoreCollector

README = Path(__file__).resolve().parents[2] / "README.md"
_ROW = re.compile(r"^\| `(kvstore_\w+)` \| (\w+) \|")


def _documented() -> dict[str, str]:
    """Metric name -> type, from the table rows of the README's Metrics section."""
    text = README.read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = [(m[1], m[2]) for line in section.splitlines() if (m := _ROW.match(line))]
    assert len(rows) == len(dict(rows)), "a metric is listed twice"
    return dict(rows)


async def test_readme_lists_every_metric_with_its_type(tmp_path: Path) -> None:
    spec = kvstore.ModelSpec("doc", "v1", num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.float16)
    url = str(tmp_path / "kv")
    async with kvstore.open(url) as store:
        await store.save_prefix(spec, list(range(8)), [(torch.zeros(8, 1, 8, dtype=torch.float16),) * 2])
        scraped = families(exposition(StoreCollector(store)))
    gc_file = families(exposition(GCReportCollector(await run_gc(url, dry_run=True))))
    assert scraped.keys().isdisjoint(gc_file)
    assert _documented() == scraped | gc_file
    assert all(name.startswith("kvstore_gc_") for name in gc_file)
