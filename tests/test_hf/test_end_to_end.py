"""A transformers model continues from a prefix saved by another process, exactly as if recomputed.

The parent process prefills and saves; a fresh Python process (``_child.py``) loads the
prefixes and continues; its next-token logits and greedy tokens are compared with a
full recompute. Covers a full hit, a partial hit (diverging mid-chunk), a miss and
multi-turn growth (each turn loads the previous turn's saved prefix).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import kvstore

pytest.importorskip("transformers")

import _models

import kvstore.hf

CHUNK = 16
CHILD = Path(__file__).with_name("_child.py")


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _full_logits(model: Any, prompt: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits: torch.Tensor = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    return logits.float()


def _run_child(tmp_path: Path, kind: str, dtype: str, model: Any, url: str, cases: dict[str, Any]) -> dict[str, Any]:
    weights, output = tmp_path / "weights.pt", tmp_path / "out.pt"
    torch.save(model.state_dict(), weights)
    job = {
        "kind": kind,
        "dtype": dtype,
        "weights": str(weights),
        "url": url,
        "chunk_tokens": CHUNK,
        "output": str(output),
        "cases": cases,
    }
    (tmp_path / "job.json").write_text(json.dumps(job))
    proc = subprocess.run(
        [sys.executable, str(CHILD), str(tmp_path / "job.json")], capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr
    results: dict[str, Any] = torch.load(output)
    return results


@pytest.mark.parametrize("kind", _models.KINDS)
async def test_fresh_process_continues_exactly_fp32(kind: str, tmp_path: Path) -> None:
    model = _models.build(kind)
    spec = kvstore.ModelSpec.from_pretrained_config(model.config, name=kind, version="test")
    assert spec.dtype == torch.float32
    url = str(tmp_path / "store")
    prompt = _tokens(40, seed=1)
    async with kvstore.open(url, chunk_tokens=CHUNK) as store:
        first = await kvstore.hf.prefill(store, spec, model, prompt, save=True, min_cached_tokens=0)
        assert (first.cached_tokens, first.computed_tokens) == (0, 40)
        turn1 = await kvstore.hf.generate(store, spec, model, prompt, 8, min_cached_tokens=0)
        assert turn1.cached_tokens == 39
        assert turn1.saved is not None
        assert turn1.saved.num_tokens == 47

    turn2_prompt = [*prompt, *turn1.tokens, *_tokens(8, seed=2)]
    cases = {
        "full": {"prompt": prompt, "new_tokens": 4, "save": False},
        "partial": {"prompt": [*prompt[:24], *_tokens(16, seed=3)], "new_tokens": 4, "save": False},
        "miss": {"prompt": _tokens(30, seed=4), "new_tokens": 4, "save": False},
        "turn2": {"prompt": turn2_prompt, "new_tokens": 8, "save": True},
    }
    got = _run_child(tmp_path, kind, "float32", model, url, cases)
    assert (got["full"]["cached"], got["full"]["computed"]) == (39, 1)
    assert got["partial"]["cached"] == 16  # the chunk holding the divergence is recomputed
    assert got["miss"]["cached"] == 0
    assert got["turn2"]["cached"] == 47  # turn 1's prompt and answer, saved by the parent

    for name, case in cases.items():
        full = _full_logits(model, case["prompt"])
        diff = (got[name]["logits"] - full).abs().max().item()
        print(f"{kind} fp32 {name}: max |logit diff| vs full recompute = {diff:.3g}")
        assert diff <= 1e-4, (name, diff)
        ref = await kvstore.hf.generate(None, spec, model, case["prompt"], case["new_tokens"])
        assert got[name]["tokens"] == ref.tokens, name

    # Turn 3, back in this process, loads what the child saved for turn 2.
    turn3_prompt = [*turn2_prompt, *got["turn2"]["tokens"], *_tokens(5, seed=5)]
    async with kvstore.open(url) as store:
        turn3 = await kvstore.hf.generate(store, spec, model, turn3_prompt, 4, min_cached_tokens=0)
    assert turn3.cached_tokens == len(turn2_prompt) + 8 - 1
    assert (turn3.first_logits.float() - _full_logits(model, turn3_prompt)).abs().max().item() <= 1e-4


async def test_fresh_process_greedy_identical_bf16(tmp_path: Path) -> None:
    model = _models.build("llama", "bfloat16")
    spec = kvstore.ModelSpec.from_pretrained_config(model.config, name="llama", version="test")
    assert spec.dtype == torch.bfloat16
    url = str(tmp_path / "store")
    prompt = _tokens(40, seed=6)
    async with kvstore.open(url, chunk_tokens=CHUNK) as store:
        await kvstore.hf.prefill(store, spec, model, prompt, save=True, min_cached_tokens=0)
    cases = {
        "full": {"prompt": prompt, "new_tokens": 32, "save": False},
        "partial": {"prompt": [*prompt[:20], *_tokens(12, seed=7)], "new_tokens": 32, "save": False},
    }
    got = _run_child(tmp_path, "llama", "bfloat16", model, url, cases)
    assert got["full"]["cached"] == 39
    assert got["partial"]["cached"] == 16
    for name, case in cases.items():
        ref = await kvstore.hf.generate(None, spec, model, case["prompt"], 32)
        assert got[name]["tokens"] == ref.tokens, name
        diff = (got[name]["logits"] - ref.first_logits.float()).abs().max().item()
        print(f"bf16 {name}: max |logit diff| vs full recompute = {diff:.3g}")
        assert diff <= 0.05, (name, diff)
