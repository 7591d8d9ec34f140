"""Every script in examples/ runs and its output means what it says; the README's API example runs as written.

Outputs are checked by their meaning (token counts that add up, logits within the
example's own tolerance, a speed-up above 1), never against a string copied from
one run: timings and floating-point noise differ between machines.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
Run = Callable[[], str]


def _runner(script: Path, tmp_path: Path) -> Run:
    """Runs ``script`` on a store in ``tmp_path`` (the same store every time) and returns its stdout."""

    def run() -> str:
        out = subprocess.run(
            [sys.executable, str(script), str(tmp_path / "store")],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    return run


def _match(pattern: str, text: str) -> re.Match[str]:
    found = re.search(pattern, text, flags=re.M)
    assert found, f"no line matching {pattern!r} in:\n{text}"
    return found


QUICKSTART_CALL = (
    r"^call (\d)\s+(\d+) tokens from the cache, (\d+) prefilled: TTFT \d+ ms"
    r"(?:; saved to .*: (\d+) chunks written, (\d+) already there)?$"
)


def _calls(text: str) -> dict[int, tuple[int, ...]]:
    """``call N`` lines: N -> (cached, prefilled[, chunks written, chunks already there])."""
    return {
        int(m.group(1)): tuple(int(g) for g in m.groups()[1:] if g is not None)
        for m in re.finditer(QUICKSTART_CALL, text, flags=re.M)
    }


def check_quickstart(run: Run) -> None:
    """A 4096-token system prompt plus a 24-token question, chunks of 256 tokens (the defaults)."""
    system, question, chunk = 4096, 24, 256
    prompt = system + question
    chunks = math.ceil(prompt / chunk)  # full chunks and the partial tail
    first = run()
    calls = _calls(first)
    assert calls[1] == (0, prompt, chunks, 0)  # a miss: everything prefilled and saved
    assert calls[2] == (system, question)  # another question: the shared system prompt hits
    speedup = float(_match(r"the cache hit is ([\d.]+)x faster", first).group(1))
    assert speedup > 1
    verified = _match(r"equal a full recompute \(max \|diff\| (\S+)\): (\w+)$", first)
    assert float(verified.group(1)) <= 1e-4  # the tolerance the example states
    assert verified.group(2) == "True"
    # A new process hits what the first one saved: all but the last token, whose logits are computed.
    assert _calls(run())[1] == (prompt - 1, 1, 0, chunks)


CHAT_ROW = r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+\d+ ms\s+\d+ ms\s+([\d.]+)x\s+(True|False)$"


def check_chat_multiturn(run: Run) -> None:
    """Four turns (the defaults: 16 new tokens per turn); each turn's prompt extends the last one's history."""
    new_tokens = 16
    rows = [m.groups() for m in re.finditer(CHAT_ROW, run(), flags=re.M)]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4]
    previous_prompt = None
    for turn, prompt, cached, new, speedup, same in rows:
        assert int(cached) + int(new) == int(prompt)
        assert same == "True"
        if previous_prompt is None:
            assert int(cached) == 0  # an empty store
        else:  # the last turn saved its prompt and the generated tokens whose KV exists (all but the last)
            assert int(cached) == previous_prompt + new_tokens - 1, turn
            assert float(speedup) > 1, turn
        previous_prompt = int(prompt)


def check_prefill_decode(run: Run) -> None:
    """Three prompts (the default) saved by the prefill process and loaded by the decode process."""
    text = run()
    computed = [int(m.group(1)) for m in re.finditer(r"^prefill\s+prompt \d+: (\d+) tokens computed", text, re.M)]
    decoded = re.findall(
        r"^decode\s+prompt \d+: loaded (\d+) tokens, computed (\d+); TTFT (\d+) ms vs (\d+) ms recomputing; "
        r"\d+ tokens (\w+)$",
        text,
        flags=re.M,
    )
    assert len(computed) == len(decoded) == 3
    for prompt, (loaded, rest, ttft, recompute, verdict) in zip(computed, decoded, strict=True):
        assert (int(loaded), int(rest)) == (prompt - 1, 1)  # only the last token is computed
        assert verdict == "identical"
        assert int(ttft) < int(recompute)


CHECKS: dict[str, Callable[[Run], None]] = {
    "quickstart.py": check_quickstart,
    "chat_multiturn.py": check_chat_multiturn,
    "prefill_decode.py": check_prefill_decode,
}


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_and_its_output_holds(script: Path, tmp_path: Path) -> None:
    assert script.name in CHECKS, f"examples/{script.name} needs a check of what its output means"
    CHECKS[script.name](_runner(script, tmp_path))


def test_every_check_has_its_example() -> None:
    assert sorted(CHECKS) == [p.name for p in EXAMPLES]


def test_a_check_can_fail() -> None:
    """The checks read numbers, so a wrong number fails them (here: a logits diff beyond the stated 1e-4)."""
    good = (
        "call 1   0 tokens from the cache, 4120 prefilled: TTFT 9 ms; saved to x: 17 chunks written, 0 already there\n"
        "call 2   4096 tokens from the cache, 24 prefilled: TTFT 1 ms\n"
        "no cache TTFT 9 ms for the same prompt: the cache hit is 9.0x faster\n"
        "verified next-token logits equal a full recompute (max |diff| {diff}): True\n"
    )
    second = (
        "call 1   4119 tokens from the cache, 1 prefilled: TTFT 1 ms; saved to x: 0 chunks written, 17 already there"
    )
    outputs = iter([good.format(diff="3.0e-05"), second])
    check_quickstart(lambda: next(outputs))
    outputs = iter([good.format(diff="2.0e-04"), second])
    with pytest.raises(AssertionError):
        check_quickstart(lambda: next(outputs))


def _readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_api_example_runs(tmp_path: Path) -> None:
    blocks = [b for b in _readme_python_blocks() if "asyncio.run(main())" in b]
    assert blocks, "README lost its runnable API example"
    out = subprocess.run([sys.executable, "-c", blocks[0]], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
