"""The maintenance commands: ls, stats, verify, retire and gc — output, JSON and exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import kvstore
from kvstore.cli import gc_cmd
from kvstore.cli.main import cli
from kvstore.formats.keys import chunk_keys, model_id, normalize_tokens
from kvstore.formats.layout import data_path, metadata_path
from kvstore.formats.shard import parse_head

OLD = kvstore.ModelSpec("tiny-llama", "v1", num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float16)
NEW = kvstore.ModelSpec("tiny-llama", "v2", num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float16)
TOKENS = list(range(40))


def _kv(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(n)
    return [(torch.randn(n, 2, 8, generator=gen).half(), torch.randn(n, 2, 8, generator=gen).half())] * 2


def _make_store(url: str, options: dict[str, Any] | None = None) -> None:
    with kvstore.sync.open(url, storage_options=options, chunk_tokens=16) as store:
        store.save_prefix(OLD, TOKENS, _kv(40))
        store.save_prefix(NEW, TOKENS, _kv(40))


def _age(root: Path, seconds: float = 7200) -> None:
    past = time.time() - seconds
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, (past, past))


def _retired_store(tmp_path: Path, *, age: bool = True) -> str:
    """A store at ``tmp_path/s`` with tiny-llama@v1 retired (6 objects of garbage) and v2 live; aged 2 h."""
    url = str(tmp_path / "s")
    _make_store(url)
    _invoke("retire", url, "tiny-llama@v1")
    if age:
        _age(tmp_path / "s")
    return url


def _invoke(*args: str, stdin: str | None = None) -> Any:
    return CliRunner().invoke(cli, list(args), input=stdin)


def test_ls_shows_versions_with_status(tmp_path: Path) -> None:
    url = str(tmp_path / "s")
    _make_store(url)
    assert _invoke("retire", url, "tiny-llama@v1", "--reason", "new weights").exit_code == 0
    result = _invoke("ls", url, "--json")
    assert result.exit_code == 0, result.output
    rows = {m["label"]: m for m in json.loads(result.output)["models"]}
    assert rows["tiny-llama@v1"]["status"] == "retired"
    assert rows["tiny-llama@v2"]["status"] == "live"
    assert rows["tiny-llama@v2"]["chunks"] == 3  # 16 + 16 + an 8-token tail
    assert rows["tiny-llama@v2"]["bytes"] > 0
    assert rows["tiny-llama@v2"]["last_write"] > 0
    table = _invoke("ls", url)
    assert table.exit_code == 0
    assert "retired" in table.output
    assert "tiny-llama@v2" in table.output


def test_stats_reports_totals_and_distribution(tmp_path: Path) -> None:
    url = str(tmp_path / "s")
    _make_store(url)
    data = json.loads(_invoke("stats", url, "--json").output)
    assert data["chunks"] == 6
    assert data["compression_ratio"] == pytest.approx(1.0)
    assert data["objects_per_chunk"] == pytest.approx(12 / 6)  # per model: 3 chunks, 2 zarr.json, a tail marker
    assert sum(data["chunk_size_histogram"].values()) == 6
    text = _invoke("stats", url)
    assert text.exit_code == 0
    assert "compression ratio" in text.output


def test_retire_json_and_errors(tmp_path: Path) -> None:
    url = str(tmp_path / "s")
    _make_store(url)
    result = _invoke("retire", url, "tiny-llama@v1", "--by", "ci", "--json")
    assert result.exit_code == 0
    [row] = json.loads(result.output)["retired"]
    assert (row["status"], row["retired_by"]) == ("retired", "ci")
    missing = _invoke("retire", url, "tiny-llama@v9")
    assert missing.exit_code == 1
    assert missing.output.startswith("kvstore: error: no model tiny-llama@v9")
    assert missing.output.count("\n") == 1
    assert _invoke("retire", url, "no-version").exit_code == 2
    with pytest.raises(kvstore.ModelRetiredError), kvstore.sync.open(url) as store:
        store.save_prefix(OLD, TOKENS, _kv(40))


def test_gc_dry_run_then_gc_frees_the_retired_version(tmp_path: Path) -> None:
    url = _retired_store(tmp_path)
    files = sorted(tmp_path.rglob("*"))
    plan = _invoke("gc", url, "--dry-run", "--json")
    assert plan.exit_code == 0, plan.output
    assert sorted(tmp_path.rglob("*")) == files
    planned = json.loads(plan.output)
    assert planned["dry_run"]
    assert planned["freed_objects"] == 6
    text = _invoke("gc", url, "--dry-run")
    assert "nothing deleted" in text.output
    assert "tiny-llama@v1" in text.output

    done = _invoke("gc", url, "--json", "--grace", "30m")
    assert done.exit_code == 0
    report = json.loads(done.output)
    assert report["freed_objects"] == 6
    assert report["reasons"] == {"retired": 6}
    with kvstore.sync.open(url) as store:
        assert store.load_prefix(NEW, TOKENS).num_tokens == 40


def test_gc_grace_keeps_young_objects(tmp_path: Path) -> None:
    url = _retired_store(tmp_path, age=False)
    report = json.loads(_invoke("gc", url, "--json").output)  # default grace 1h: all still young
    assert report["freed_objects"] == 0
    assert sum(m["young_objects"] for m in report["models"]) == 6


def test_gc_refuses_a_short_grace_unless_allowed(tmp_path: Path) -> None:
    url = _retired_store(tmp_path)
    files = sorted(tmp_path.rglob("*"))
    for grace in ("0", "30s", "1m"):
        refused = _invoke("gc", url, "--grace", grace, "--json")
        assert refused.exit_code == 2  # a usage error, before the store is touched
        assert "--allow-short-grace" in refused.output
    assert sorted(tmp_path.rglob("*")) == files
    done = _invoke("gc", url, "--grace", "30s", "--allow-short-grace", "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["freed_objects"] == 6


def test_gc_asks_on_a_terminal_above_the_threshold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = _retired_store(tmp_path)
    monkeypatch.setattr(gc_cmd, "is_terminal", lambda: True)
    files = sorted(tmp_path.rglob("*"))
    no = _invoke("gc", url, "--confirm-threshold", "5", stdin="n\n")
    assert no.exit_code == 1
    assert "Delete 6 objects" in no.output
    assert sorted(tmp_path.rglob("*")) == files
    yes = _invoke("gc", url, "--confirm-threshold", "5", stdin="y\n")
    assert yes.exit_code == 0
    assert "GC summary" in yes.output
    assert _invoke("gc", url, "--confirm-threshold", "5").exit_code == 0  # nothing left: no question


def test_verify_finds_and_repairs_damage(tmp_path: Path) -> None:
    url = str(tmp_path / "s")
    _make_store(url)
    ok = _invoke("verify", url, "--json")
    assert ok.exit_code == 0
    assert json.loads(ok.output)["chunks_checked"] == 6
    key = chunk_keys(NEW, normalize_tokens(TOKENS), 16)[1]
    obj = tmp_path / "s" / data_path(model_id(NEW), key.digest, key.num_tokens)
    data = bytearray(obj.read_bytes())
    data[parse_head(bytes(data), NEW.num_layers, len(data)).spans[1].offset + 3] ^= 0xFF  # a byte of layer 1
    obj.write_bytes(bytes(data))
    bad = _invoke("verify", url, "--model", "tiny-llama@v2", "--json")
    assert bad.exit_code == 3
    report = json.loads(bad.output)
    assert report["chunks_checked"] == 3
    assert [(d["key"], d["problem"]) for d in report["damaged"]] == [(key.hex, "layer 1: layer checksum mismatch")]
    fixed = _invoke("verify", url, "--model", "tiny-llama@v2", "--repair")
    assert fixed.exit_code == 0
    assert "1 damaged, 1 deleted" in fixed.output
    assert _invoke("verify", url, "--json").exit_code == 0
    with kvstore.sync.open(url) as store:
        assert store.load_prefix(NEW, TOKENS).num_tokens == 16  # chunk 1 is a miss now
        store.save_prefix(NEW, TOKENS, _kv(40))
        assert store.load_prefix(NEW, TOKENS).num_tokens == 40
    assert _invoke("verify", url, "--model", "nope@v1").exit_code == 1


@pytest.mark.parametrize("command", ["ls", "stats", "verify", "gc"])
def test_missing_store_is_one_line_error(tmp_path: Path, command: str) -> None:
    result = _invoke(command, str(tmp_path / "missing"))
    assert result.exit_code == 1
    assert result.output.startswith("kvstore: error:")
    assert result.output.count("\n") == 1
    assert not (tmp_path / "missing").exists()


def test_debug_shows_the_traceback_and_bad_grace_is_a_usage_error(tmp_path: Path) -> None:
    result = _invoke("--debug", "ls", str(tmp_path / "missing"))
    assert result.exit_code == 1
    assert isinstance(result.exception, kvstore.StoreConfigError)
    assert _invoke("gc", str(tmp_path), "--grace", "soon").exit_code == 2


@pytest.mark.s3
def test_subprocess_gc_on_s3_with_settings_from_the_environment(s3_store_url: Any) -> None:
    url, options = s3_store_url
    _make_store(url, options)
    exe = shutil.which("kvstore", path=str(Path(sys.executable).parent))
    assert exe
    env = {**os.environ, "AWS_ENDPOINT_URL": options["endpoint_url"], "AWS_DEFAULT_REGION": "us-east-1"}
    retire = subprocess.run([exe, "retire", url, "tiny-llama@v1"], capture_output=True, text=True, env=env)
    assert retire.returncode == 0, retire.stderr
    time.sleep(1.1)
    out = subprocess.run(
        [exe, "gc", url, "--grace", "1s", "--allow-short-grace", "--json"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["reasons"] == {"retired": 6}
    ls = subprocess.run([exe, "ls", url, "--json"], capture_output=True, text=True, env=env)
    rows = {m["label"]: m for m in json.loads(ls.stdout)["models"]}
    assert rows["tiny-llama@v1"]["objects"] == 0
    assert rows["tiny-llama@v2"]["chunks"] == 3
    bad = subprocess.run([exe, "ls", "s3://no-such-bucket-kvstore/x"], capture_output=True, text=True, env=env)
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1


def test_verify_repair_leaves_chunks_whose_zarr_json_differs(tmp_path: Path) -> None:
    """zarr.json is not part of kvstore's format: another writer's (an extra attribute, other formatting) is no
    damage, so ``verify --repair`` keeps it and the chunks; a missing or unreadable one is rewritten, the data
    untouched. Each array's is checked once, however many chunks it holds."""
    url = str(tmp_path / "s")
    _make_store(url)  # NEW: 2 chunks in the array of 16-token chunks, 1 in that of 8-token ones
    with kvstore.sync.open(url) as store:
        store.save_prefix(NEW, TOKENS[:12], _kv(12))  # and 1 in an array of 12-token chunks
    keys = chunk_keys(NEW, normalize_tokens(TOKENS), 16)
    arrays = [tmp_path / "s" / metadata_path(model_id(NEW), n) for n in (16, 8, 12)]
    other = json.loads(arrays[0].read_text())
    other["attributes"]["written_by"] = "another writer"
    arrays[0].write_text(json.dumps(other))  # additive change, other formatting
    arrays[1].unlink()  # missing
    arrays[2].write_bytes(b"\xff not json")  # unreadable
    objects = [tmp_path / "s" / data_path(model_id(NEW), k.digest, k.num_tokens) for k in keys]
    data = [p.read_bytes() for p in objects]

    out = _invoke("verify", url, "--model", "tiny-llama@v2", "--repair", "--json")
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    assert (report["chunks_checked"], report["chunks_damaged"], report["chunks_repaired"]) == (4, 0, 0)
    assert (report["metadata_problems"], report["metadata_rewritten"]) == (2, 2)
    assert [p.read_bytes() for p in objects] == data  # no chunk deleted
    assert json.loads(arrays[0].read_text()) == other  # another writer's metadata kept
    for p in arrays[1:]:
        assert json.loads(p.read_text())["zarr_format"] == 3  # written again
    with kvstore.sync.open(url) as store:
        assert store.load_prefix(NEW, TOKENS).num_tokens == 40


def test_verify_repair_rewrites_a_zarr_json_that_names_another_codec(tmp_path: Path) -> None:
    """An array's zarr.json names the store's codec: with another one, stock zarr would decode the data wrongly."""
    from kvstore.formats.layout import zarr_array_metadata

    url = str(tmp_path / "s")
    _make_store(url)  # the default codec
    meta_path = tmp_path / "s" / metadata_path(model_id(NEW), 16)
    right = meta_path.read_bytes()
    with kvstore.sync.open(url) as store:
        codec = store.options.codec
    other = "none" if codec != "none" else "lz4"
    meta_path.write_bytes(zarr_array_metadata(NEW, 16, other))

    out = _invoke("verify", url, "--model", "tiny-llama@v2", "--json")
    assert json.loads(out.output)["metadata_problems"] == 1
    assert meta_path.read_bytes() == zarr_array_metadata(NEW, 16, other)  # reported, not touched
    out = _invoke("verify", url, "--model", "tiny-llama@v2", "--repair", "--json")
    report = json.loads(out.output)
    assert (report["chunks_damaged"], report["metadata_problems"], report["metadata_rewritten"]) == (0, 1, 1)
    assert meta_path.read_bytes() == right


def test_verify_finds_a_chunk_of_another_codec_than_the_stores(tmp_path: Path) -> None:
    """Every chunk of a store has the store's codec: a data object of another is damage, its path reported."""
    url, other = str(tmp_path / "s"), str(tmp_path / "lz4")
    _make_store(url)
    with kvstore.sync.open(other, chunk_tokens=16, codec="lz4") as store:
        store.save_prefix(NEW, TOKENS, _kv(40))
    key = chunk_keys(NEW, normalize_tokens(TOKENS), 16)[0]
    path = data_path(model_id(NEW), key.digest, key.num_tokens)
    (tmp_path / "s" / path).write_bytes((tmp_path / "lz4" / path).read_bytes())
    report = json.loads(_invoke("verify", url, "--model", "tiny-llama@v2", "--json").output)
    assert report["chunks_checked"] == 3
    assert [(d["key"], "codec" in d["problem"]) for d in report["damaged"]] == [(path, True)]


def test_gc_checkpoint_is_used_and_forgotten_when_done(tmp_path: Path) -> None:
    from kvstore.gc.checkpoint import Checkpoint

    url = _retired_store(tmp_path)
    ckpt = tmp_path / "run.ckpt"
    Checkpoint.open(ckpt, url="file:///another/store", t0=time.time(), grace=1800.0, dry_run=False).close()
    done = _invoke("gc", url, "--json", "--grace", "30m", "--checkpoint", str(ckpt))
    assert done.exit_code == 0, done.output
    report = json.loads(done.output)
    assert report["freed_objects"] == 6
    assert "started afresh" in report["checkpoint"]
    assert "another store" in report["checkpoint"]
    assert not ckpt.exists()
    text = _invoke("gc", url, "--checkpoint", str(ckpt))
    assert text.exit_code == 0
    assert "checkpoint:" not in text.output


def test_sigterm_stops_a_gc_as_ctrl_c_does() -> None:
    import asyncio
    import signal

    cleaned: list[bool] = []

    async def run() -> None:
        asyncio.get_running_loop().call_later(0.05, signal.raise_signal, signal.SIGTERM)
        try:
            await asyncio.sleep(30)
        finally:
            cleaned.append(True)  # where a checkpoint is closed

    before = signal.getsignal(signal.SIGTERM)
    with gc_cmd._sigterm_interrupts(), pytest.raises(KeyboardInterrupt):
        asyncio.run(run())
    assert cleaned == [True]
    assert signal.getsignal(signal.SIGTERM) == before
