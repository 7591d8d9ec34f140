"""``KVStoreConnector``: vLLM's KV connector interface (v1) over kvstore.

    --kv-transfer-config '{"kv_connector": "KVStoreConnector",
                           "kv_connector_module_path": "kvstore.integrations.vllm",
                           "kv_role": "kv_both",
                           "kv_connector_extra_config": {"url": "s3://bucket/kv"}}'

The class only routes vLLM's calls: ``scheduler.SchedulerSide`` answers lookups and
plans each step, ``worker.WorkerSide`` moves the KV; both share one store per process
(``runtime``). The ``ModelSpec`` comes from vLLM's KV cache layout and the weights'
identity (``identity``). A model this connector cannot map (several KV cache groups,
MLA, K and V of different sizes, pipeline parallelism) runs without it, with a warning.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvstore.integrations.vllm.config import ConnectorConfig
from kvstore.integrations.vllm.counters import ConnectorCounters, Counts
from kvstore.integrations.vllm.identity import RequestVersions, shard_name, weights_version
from kvstore.integrations.vllm.jobs import StepPlan
from kvstore.integrations.vllm.metrics import KVStoreConnectorStats, KVStorePromMetrics
from kvstore.integrations.vllm.paged import UnsupportedLayoutError
from kvstore.integrations.vllm.runtime import StoreRuntime, acquire_runtime, release_runtime
from kvstore.integrations.vllm.scheduler import SchedulerSide
from kvstore.integrations.vllm.worker import WorkerSide
from kvstore.spec import ModelSpec

__all__ = ["KVStoreConnector", "KVStoreMetadata"]

logger = logging.getLogger("kvstore.vllm")


class KVStoreMetadata(KVConnectorMetadata):  # type: ignore[misc]  # vLLM is untyped here
    """One step's plan, from the scheduler-side connector to the workers."""

    def __init__(self, plan: StepPlan) -> None:
        self.plan = plan


class KVStoreConnector(KVConnectorBase_V1):  # type: ignore[misc]  # vLLM is untyped here
    """Loads prompt prefixes from a kvstore store instead of recomputing them, and saves what it computed."""

    _cache_hit_source = CacheHitSource.EXTERNAL_UNSPECIFIED

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._config = ConnectorConfig.from_extra_config(self._kv_transfer_config.kv_connector_extra_config)
        self._counters = ConnectorCounters()
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        self._runtime: StoreRuntime | None = None
        layout = _layout(vllm_config, kv_cache_config)
        if isinstance(layout, str):
            logger.warning("kvstore connector is off for this model: %s", layout)
            return
        layer_names, attn = layout
        name = self._config.model_name or _model_name(vllm_config)
        version = self._config.model_version or _model_version(vllm_config)
        block_size = attn.block_size
        parallel = vllm_config.parallel_config
        tp, replicas = parallel.tensor_parallel_size, getattr(kv_cache_config, "kv_tp_replicas", 1) or 1

        def spec(tp_rank: int) -> ModelSpec:
            shard = shard_name(name, tp_size=tp, tp_rank=tp_rank, kv_replicas=replicas)
            return ModelSpec(shard, version, len(layer_names), attn.num_kv_heads, attn.head_size, attn.dtype)

        self._runtime = acquire_runtime(self._config)
        if role == KVConnectorRole.SCHEDULER:
            if self._kv_transfer_config.kv_load_failure_policy != "recompute":
                # A cache must never fail a request: a load that goes wrong costs a recompute.
                logger.info("kvstore connector: kv_load_failure_policy set to 'recompute'")
                self._kv_transfer_config.kv_load_failure_policy = "recompute"
            shards = [spec(r) for r in range(0, tp, replicas)]
            self._scheduler = SchedulerSide(
                self._config, self._runtime, shards, block_size, self._counters, RequestVersions(version)
            )
        else:
            self._runtime.has_worker = True
            self._worker = WorkerSide(
                self._config, self._runtime, spec(_tp_rank()), layer_names, block_size, self._counters
            )
        logger.info("kvstore connector (%s) on %s as %s", role.name.lower(), self._config.url, spec(0).label)

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self._worker is None:
            return
        try:
            self._worker.register(kv_caches)
        except UnsupportedLayoutError as exc:
            logger.warning("kvstore connector is off for this model: %s", exc)
            self._worker = None

    def _plan(self) -> StepPlan | None:
        meta = self._connector_metadata
        if self._worker is None or not self._worker.ready or not isinstance(meta, KVStoreMetadata):
            return None
        return meta.plan

    def handle_preemptions(self, kv_connector_metadata: Any) -> None:
        if self._worker is not None:
            self._worker.barrier()

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        plan = self._plan()
        if plan is not None and self._worker is not None:
            self._worker.start(plan)

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._worker is not None and self._worker.ready:
            self._worker.wait_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        """Nothing per layer: a prompt is saved once complete, after the forward (``wait_for_save``)."""

    def wait_for_save(self) -> None:
        plan = self._plan()
        if plan is not None and self._worker is not None:
            self._worker.finish_step(plan)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_errors() if self._worker is not None else set()

    # ------------------------------------------------------------------ scheduler side

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        if self._scheduler is None:
            return 0, False
        return self._scheduler.matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if self._scheduler is not None:
            self._scheduler.after_alloc(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        plan = self._scheduler.plan(scheduler_output) if self._scheduler is not None else StepPlan()
        return KVStoreMetadata(plan)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self._scheduler is not None:
            self._scheduler.finished(request)
        return False, None

    # ------------------------------------------------------------------ stats and lifetime

    def totals(self) -> Counts:
        """This connector's counters since it started (the interval stats go to vLLM's logger and Prometheus)."""
        return self._counters.totals()

    def get_kv_connector_stats(self) -> KVStoreConnectorStats | None:
        counts = self._counters.take_interval()
        return None if counts.is_empty() else KVStoreConnectorStats(data=counts.as_dict())

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVStoreConnectorStats:
        return KVStoreConnectorStats(data=dict(data) if data else {})

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVStorePromMetrics:
        return KVStorePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        """Wait for saves to leave vLLM's blocks, then (last user of the store) for their uploads."""
        if self._worker is not None:
            self._worker.close()
        runtime, self._runtime = self._runtime, None
        if runtime is not None:
            release_runtime(runtime)


def _layout(vllm_config: Any, kv_cache_config: Any) -> tuple[list[str], Any] | str:
    """The attention layers and their KV spec, or why this model cannot use the connector."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    if kv_cache_config is None or len(kv_cache_config.kv_cache_groups) != 1:
        return "it has several KV cache groups (hybrid attention)"
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        return "pipeline parallelism is not supported"
    group = kv_cache_config.kv_cache_groups[0]
    spec = group.kv_cache_spec
    if type(spec) is not FullAttentionSpec or spec.sliding_window is not None:
        return f"its KV cache is {type(spec).__name__}, not plain full attention"
    if spec.head_size_v != spec.head_size:
        return "K and V have different head sizes"
    return list(group.layer_names), spec


def _model_name(vllm_config: Any) -> str:
    mc = vllm_config.model_config
    served = mc.served_model_name
    if isinstance(served, (list, tuple)):
        served = served[0] if served else None
    if isinstance(served, str) and served and served != mc.model:
        return served
    return os.path.basename(os.path.normpath(str(mc.model))) or str(mc.model)


def _model_version(vllm_config: Any) -> str:
    """The weights' identity: a local directory's revision or digest; a hub model's cached snapshot."""
    mc = vllm_config.model_config
    path = str(mc.model)
    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download

        path = snapshot_download(path, revision=mc.revision, local_files_only=True)
    return weights_version(path)


def _tp_rank() -> int:
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    rank: int = get_tensor_model_parallel_rank()
    return rank
