"""Every script in examples/ runs, and the README's API example runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_there_are_examples() -> None:
    assert EXAMPLES


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script: Path, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_quickstart_reports_bit_exact_hit(tmp_path: Path) -> None:
    script = ROOT / "examples" / "quickstart.py"
    first = subprocess.run([sys.executable, str(script), str(tmp_path / "s")], capture_output=True, text=True)
    second = subprocess.run([sys.executable, str(script), str(tmp_path / "s")], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "call 1   0 tokens from the cache, 4120 prefilled" in first.stdout
    assert "17 chunks written, 0 already there" in first.stdout
    assert "call 2   4096 tokens from the cache, 24 prefilled" in first.stdout
    assert "equal a full recompute (max |diff| 0.0e+00): True" in first.stdout
    # A new process hits what the first one saved.
    assert "call 1   4119 tokens from the cache, 1 prefilled" in second.stdout
    assert "0 chunks written, 17 already there" in second.stdout


def _readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_api_example_runs(tmp_path: Path) -> None:
    blocks = [b for b in _readme_python_blocks() if "asyncio.run(main())" in b]
    assert blocks, "README lost its runnable API example"
    out = subprocess.run([sys.executable, "-c", blocks[0]], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
