"""The kvstore console script: output, JSON and exit codes, in-process and as a real subprocess."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from click.testing import CliRunner

import kvstore
from kvstore.cli.main import cli

SPEC = kvstore.ModelSpec("tiny-llama", "v7", num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float16)


def _make_store(path: Path) -> None:
    with kvstore.sync.open(path, chunk_tokens=16) as store:
        kv = [(torch.ones(20, 2, 8, dtype=torch.float16), torch.zeros(20, 2, 8, dtype=torch.float16))] * 2
        store.save_prefix(SPEC, list(range(20)), kv)


def test_info_lists_models_as_json(tmp_path: Path) -> None:
    _make_store(tmp_path / "s")
    result = CliRunner().invoke(cli, ["info", "--json", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["chunk_tokens"] == 16
    assert [(m["name"], m["version"], m["dtype"], m["layers"]) for m in payload["models"]] == [
        ("tiny-llama", "v7", "float16", 2)
    ]


def test_info_table(tmp_path: Path) -> None:
    _make_store(tmp_path / "s")
    result = CliRunner().invoke(cli, ["info", str(tmp_path / "s")])
    assert result.exit_code == 0
    assert "tiny-llama" in result.output
    assert "16 tokens per chunk" in result.output


def test_missing_store_is_one_line_error_and_creates_nothing(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["info", str(tmp_path / "nothing")])
    assert result.exit_code == 1
    assert result.output.startswith("kvstore: error:")
    assert "Traceback" not in result.output
    assert not (tmp_path / "nothing").exists()


def test_bad_storage_option_is_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["info", str(tmp_path), "-o", "novalue"])
    assert result.exit_code == 2


def test_console_script_subprocess(tmp_path: Path) -> None:
    _make_store(tmp_path / "s")
    exe = shutil.which("kvstore", path=str(Path(sys.executable).parent))
    assert exe, "the kvstore console script is not installed"
    out = subprocess.run([exe, "info", "--json", str(tmp_path / "s")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["models"][0]["version"] == "v7"
    bad = subprocess.run([exe, "info", str(tmp_path / "missing")], capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1
