"""``kvstore gc --metrics-file``: the run's results as a textfile-collector file, parsed back."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from _scrape import samples, value
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

import kvstore
from kvstore.cli.main import cli

OLD = kvstore.ModelSpec("tiny", "v1", num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float16)
NEW = kvstore.ModelSpec("tiny", "v2", num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float16)


def _store_with_a_retired_version(root: Path) -> str:
    url = str(root / "s")
    kv = [(torch.ones(40, 2, 8, dtype=torch.float16),) * 2 for _ in range(2)]
    with kvstore.sync.open(url, chunk_tokens=16) as store:
        store.save_prefix(OLD, list(range(40)), kv)
        store.save_prefix(NEW, list(range(40)), kv)
        store.retire("tiny", "v1")
    past = time.time() - 7200
    for path in (root / "s").rglob("*"):
        if path.is_file():
            os.utime(path, (past, past))
    return url


def test_metrics_file_matches_the_json_report(tmp_path: Path) -> None:
    url = _store_with_a_retired_version(tmp_path)
    out_dir = tmp_path / "textfile"
    out_dir.mkdir()
    target = out_dir / "kvstore_gc.prom"
    before = time.time()
    for dry in (True, False):
        args = ["gc", url, "--grace", "1h", "--yes", "--json", "--metrics-file", str(target)]
        result = CliRunner().invoke(cli, args + (["--dry-run"] if dry else []))
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        store = report["url"]  # as the store names itself (file://...)
        assert os.listdir(out_dir) == ["kvstore_gc.prom"]  # written aside, then renamed over the target
        text = target.read_text()
        s = samples(text)
        assert value(s, "kvstore_gc_dry_run", store=store) == float(dry)
        assert value(s, "kvstore_gc_success", store=store) == 1
        assert value(s, "kvstore_gc_objects_listed", store=store) == report["objects_listed"]
        assert before <= value(s, "kvstore_gc_last_run_timestamp_seconds", store=store) <= time.time()
        for m in report["models"]:
            labels = {"store": store, "model": m["label"], "status": m["status"]}
            assert value(s, "kvstore_gc_freed_objects", **labels) == m["freed_objects"]
            assert value(s, "kvstore_gc_freed_bytes", **labels) == m["freed_bytes"]
            assert value(s, "kvstore_gc_kept_objects", **labels) == m["kept_objects"]
        assert value(s, "kvstore_gc_freed_objects", store=store, model="tiny@v1", status="retired") > 0
        assert value(s, "kvstore_gc_garbage_objects", store=store, reason="retired") == report["reasons"]["retired"]
        assert {f.type for f in text_string_to_metric_families(text)} == {"gauge"}
    assert report["freed_objects"] > 0  # the second run deleted for real


def test_an_unwritable_metrics_file_is_a_one_line_error(tmp_path: Path) -> None:
    url = _store_with_a_retired_version(tmp_path)
    result = CliRunner().invoke(
        cli, ["gc", url, "--dry-run", "--metrics-file", str(tmp_path / "no-such-dir" / "gc.prom")]
    )
    assert result.exit_code == 1
    assert "could not write --metrics-file" in result.output
