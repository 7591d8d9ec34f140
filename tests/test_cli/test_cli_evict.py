"""``kvstore gc --max-bytes / --max-idle``: human sizes and durations, the summary, JSON, namespaces, metrics."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import click
import pytest
import torch
from click.testing import CliRunner

import kvstore
import kvstore.access
from kvstore.cli.common import parse_size
from kvstore.cli.main import cli

SPEC = kvstore.ModelSpec("tiny-llama", "v1", num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float16)
HOURS_AGO = 3


def _kv(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(n)
    return [(torch.randn(n, 2, 8, generator=gen).half(), torch.randn(n, 2, 8, generator=gen).half())] * 2


def _old_store(root: Path, monkeypatch: pytest.MonkeyPatch, namespace: str | None = None) -> str:
    """Two 32-token prompts saved (and so used) 3 hours ago, every file aged to match."""
    past = time.time() - HOURS_AGO * 3600
    monkeypatch.setattr(kvstore.access, "wall_clock", lambda: past)
    url = str(root / "s")
    with kvstore.sync.open(url, chunk_tokens=16, namespace=namespace) as store:
        store.save_prefix(SPEC, list(range(32)), _kv(32))
        store.save_prefix(SPEC, list(range(100, 132)), _kv(32))
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, (past, past))
    monkeypatch.setattr(kvstore.access, "wall_clock", time.time)
    return url


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args))


@pytest.mark.parametrize(
    ("text", "expected"),
    [("500GiB", 500 << 30), ("1.5TB", 1_500_000_000_000), ("800MB", 800_000_000), ("4096", 4096), ("2kib", 2048)],
)
def test_sizes_are_decimal_or_binary(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "5 GiBs", "-1GB", "1e3", "12XB"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(click.BadParameter):
        parse_size(text)


def test_bad_budget_is_a_usage_error(tmp_path: Path) -> None:
    result = _invoke("gc", str(tmp_path / "s"), "--max-bytes", "lots")
    assert result.exit_code == 2
    assert "--max-bytes" in result.output
    result = _invoke("gc", str(tmp_path / "s"), "--max-idle", "a week")
    assert result.exit_code == 2
    assert "--max-idle" in result.output


def test_max_bytes_json_and_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = _old_store(tmp_path / "store", monkeypatch)
    with kvstore.sync.open(url) as store:  # one prompt used just now: it stays
        assert store.load_prefix(SPEC, list(range(100, 132))).num_tokens == 32
    prom = tmp_path / "gc.prom"
    result = _invoke("gc", url, "--max-bytes", "0B", "--yes", "--json", "--metrics-file", str(prom))
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["evicted_chunks"] == 2
    assert report["budget_met"] is False
    assert "grace" in report["budget_note"]
    assert report["bytes_after"] > 0
    text = prom.read_text()
    assert 'kvstore_gc_evicted_chunks{model="tiny-llama@v1"' in text
    assert "kvstore_gc_budget_met" in text
    with kvstore.sync.open(url) as store:
        assert store.lookup(SPEC, list(range(32))) == 0
        assert store.lookup(SPEC, list(range(100, 132))) == 32


def test_max_idle_table_and_dry_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = _old_store(tmp_path / "store", monkeypatch)
    dry = _invoke("gc", url, "--max-idle", "2h", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "evicted chunks" in dry.output
    with kvstore.sync.open(url, record_access=False) as store:
        assert store.lookup(SPEC, list(range(32))) == 32
    result = _invoke("gc", url, "--max-idle", "2h", "--yes")
    assert result.exit_code == 0, result.output
    assert "after evicting 4 chunks" in result.output
    with kvstore.sync.open(url, record_access=False) as store:
        assert store.lookup(SPEC, list(range(32))) == 0


def test_namespace_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = _old_store(tmp_path / "store", monkeypatch, namespace="team-a")
    result = _invoke("gc", url, "--namespace", "team-a", "--max-bytes", "1KiB", "--yes", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["url"].endswith("namespaces/team-a")
    assert report["evicted_chunks"] == 4
    assert _invoke("gc", url, "--namespace", "../x").exit_code == 2


def test_ls_and_stats_show_last_use_per_model_and_namespace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = _old_store(tmp_path / "store", monkeypatch, namespace="team-a")  # only a namespace at the root
    with kvstore.sync.open(url, namespace="team-b") as store:
        store.save_prefix(SPEC, list(range(16)), _kv(16))
    result = _invoke("ls", url, "--json")
    assert result.exit_code == 0, result.output
    spaces = {n["name"]: n for n in json.loads(result.output)["namespaces"]}
    assert spaces["team-a"]["chunks"] == 4
    assert spaces["team-b"]["chunks"] == 1
    assert time.time() - HOURS_AGO * 3600 - 5 < spaces["team-a"]["last_use"] < time.time() - HOURS_AGO * 3600 + 5
    assert spaces["team-b"]["last_use"] > time.time() - 60
    ns_url = f"{url}/namespaces/team-a"
    with kvstore.sync.open(ns_url) as store:
        assert store.load_prefix(SPEC, list(range(32))).num_tokens == 32  # a use, recorded on close
    result = _invoke("stats", ns_url, "--json")
    assert result.exit_code == 0, result.output
    [model] = json.loads(result.output)["models"]
    assert model["last_use"] > time.time() - 60  # from the access record's name
    assert model["last_write"] < time.time() - 3600
    text = _invoke("ls", url)
    assert "team-a" in text.output
    assert "last use" in text.output
