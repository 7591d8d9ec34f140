"""Run in a fresh Python process: load saved prefixes through kvstore.hf and continue.

    python _child.py JOB.json

The job names the model (whose weights the parent saved), the store and the cases; the
results (token counts, next-token logits, greedy tokens) go to the job's output file.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

import _models

import kvstore
import kvstore.hf


async def main(job: dict[str, Any]) -> None:
    model = _models.build(job["kind"], job["dtype"])
    model.load_state_dict(torch.load(job["weights"]))
    spec = kvstore.ModelSpec.from_pretrained_config(model.config, name=job["kind"], version="test")
    results: dict[str, Any] = {}
    async with kvstore.open(job["url"], chunk_tokens=job["chunk_tokens"]) as store:
        for name, case in job["cases"].items():
            out = await kvstore.hf.generate(
                store, spec, model, case["prompt"], case["new_tokens"], save=case["save"], min_cached_tokens=0
            )
            results[name] = {
                "cached": out.cached_tokens,
                "computed": out.computed_tokens,
                "tokens": out.tokens,
                "logits": out.first_logits.float(),
            }
    torch.save(results, job["output"])


if __name__ == "__main__":
    asyncio.run(main(json.loads(Path(sys.argv[1]).read_text())))
