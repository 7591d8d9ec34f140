"""Run vLLM engines one after another in this (fresh) process, as a test's job file says.

    .venv-vllm/bin/python _vllm_child.py JOB.json

Each engine (with or without the kvstore connector) first runs a short warm-up prompt,
then the job's steps (a step is one ``generate`` call: several prompts form one batch),
then shuts down, which waits for its saves. ``build`` makes the models first. Per prompt it records the greedy tokens,
their logprobs, vLLM's ``num_cached_tokens`` and the step's wall time; per engine the
connector's counters on the scheduler and the worker side. Results go to the job's
output file as JSON.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engines: start in seconds

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from vllm import LLM, SamplingParams
from vllm.config import KVTransferConfig
from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group
from vllm.inputs import TokensPrompt

sys.path.insert(0, str(Path(__file__).parent))
import _vllm_model

WARMUP = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]  # below the connector's minimum: never stored


def connector_config(extra: dict[str, Any]) -> KVTransferConfig:
    return KVTransferConfig(
        kv_connector="KVStoreConnector",
        kv_connector_module_path="kvstore.integrations.vllm",
        kv_role="kv_both",
        kv_connector_extra_config=extra,
    )


def run_engine(spec: dict[str, Any]) -> dict[str, Any]:
    model = spec["model"]
    if spec.get("replace_weights"):
        shutil.copyfile(spec["replace_weights"], Path(model) / "model.safetensors")
    kwargs: dict[str, Any] = {}
    if spec.get("connector") is not None:
        kwargs["kv_transfer_config"] = connector_config(spec["connector"])
    t0 = time.perf_counter()
    llm = LLM(
        model=model,
        skip_tokenizer_init=True,
        dtype="bfloat16",
        max_model_len=spec.get("max_model_len", 2048),
        enforce_eager=True,
        kv_cache_memory_bytes=spec.get("kv_cache_bytes", 64 << 20),
        seed=0,
        **kwargs,
    )
    out: dict[str, Any] = {"start_s": time.perf_counter() - t0, "steps": {}}
    llm.generate([TokensPrompt(prompt_token_ids=WARMUP)], SamplingParams(max_tokens=1), use_tqdm=False)
    for step in spec["steps"]:
        prompts = [
            TokensPrompt(
                prompt_token_ids=p["tokens"], **({"cache_salt": p["cache_salt"]} if p.get("cache_salt") else {})
            )
            for p in step["prompts"]
        ]
        params = SamplingParams(max_tokens=step.get("max_tokens", 4), temperature=0.0, logprobs=1)
        t = time.perf_counter()
        results = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t
        rows = []
        for r in results:
            o = r.outputs[0]
            logprobs = [entry[tok].logprob for tok, entry in zip(o.token_ids, o.logprobs or [], strict=True)]
            rows.append({"tokens": list(o.token_ids), "logprobs": logprobs, "cached": r.num_cached_tokens})
        out["steps"][step["name"]] = {"seconds": seconds, "rows": rows}
    connectors = {}
    vllm_config = llm.llm_engine.vllm_config
    if has_kv_transfer_group():
        connectors = {
            "worker": get_kv_transfer_group(),
            "scheduler": llm.llm_engine.engine_core.engine_core.scheduler.connector,
        }
    llm.llm_engine.engine_core.shutdown()  # the connector waits for its uploads here
    for role, connector in connectors.items():  # counted after the uploads finished
        out[role] = connector.totals().as_dict()
    if connectors and spec.get("metrics"):
        out["metrics"] = export_metrics(type(connectors["worker"]), vllm_config, out["worker"])
    del llm
    gc.collect()
    return out


def export_metrics(cls: Any, vllm_config: Any, totals: dict[str, Any]) -> dict[str, Any]:
    """The connector's counters through vLLM's stats hooks (aggregated twice) and its Prometheus hook."""
    stats = cls.build_kv_connector_stats(dict(totals))
    reduced = stats.aggregate(cls.build_kv_connector_stats(dict(totals))).reduce()
    registry = CollectorRegistry()
    types = {kind: functools.partial(kind, registry=registry) for kind in (Counter, Gauge, Histogram)}
    prom = cls.build_prom_metrics(vllm_config, types, ["model_name", "engine"], {0: ["m", "0"]})
    prom.observe(totals, 0)
    samples = {
        name: registry.get_sample_value(f"vllm:kvstore_{name}_total", {"model_name": "m", "engine": "0"})
        for name in ("lookups", "loads", "load_bytes", "saves")
    }
    return {"reduced": reduced, "prometheus": samples}


def main(job: dict[str, Any]) -> None:
    for model in job.get("build", []):
        _vllm_model.build(model["dir"], model["seed"])
    results = {spec["name"]: run_engine(spec) for spec in job["engines"]}
    Path(job["output"]).write_text(json.dumps(results))


if __name__ == "__main__":
    main(json.loads(Path(sys.argv[1]).read_text()))
