"""The atheris harnesses in ``fuzz/`` run a bounded number of inputs each: no crash, no non-kvstore error.

Coverage-guided fuzzing complements the hypothesis fuzzers beside this file; the
budget here is seconds, a real campaign runs ``python fuzz/<harness>.py`` longer.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="atheris is not installed")

FUZZ_DIR = Path(__file__).resolve().parents[2] / "fuzz"
HARNESSES = sorted(p.name for p in FUZZ_DIR.glob("fuzz_*.py"))


def test_every_decoder_has_a_harness() -> None:
    assert HARNESSES == ["fuzz_codecs.py", "fuzz_records.py", "fuzz_shard.py"]


@pytest.mark.parametrize("harness", HARNESSES)
def test_harness_finds_nothing_in_a_bounded_run(harness: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(FUZZ_DIR / harness), "-atheris_runs=20000", "-seed=1", f"-artifact_prefix={tmp_path}/"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not list(tmp_path.glob("crash-*"))
