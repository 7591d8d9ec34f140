"""Which ``ModelSpec`` a vLLM engine's KV is stored under (no vLLM import here).

Keys must change whenever the KV bytes would: new weights (``weights_version``), a
tensor- or pipeline-parallel shard of the heads or layers (``shard_name``), a LoRA
adapter or a ``cache_salt`` (``request_version``). Everything else that determines
the bytes (layers, KV heads per rank, head size, KV dtype, chunk size) is already
part of ``ModelSpec`` and of kvstore's chunk keys.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import blake3

__all__ = ["WEIGHT_SUFFIXES", "RequestVersions", "request_version", "shard_name", "weights_version"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
"""Files whose contents are the weights; ``config.json`` is hashed with them (it changes RoPE, norms, ...)."""

_SNAPSHOT = re.compile(r"[0-9a-f]{40}")
_DIGEST_CHARS = 32  # 128 bits of blake3


def weights_version(model: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """A version string that changes whenever the weights in ``model`` (a local directory) change.

    A Hugging Face cache snapshot (``.../snapshots/<commit>``) is named by its commit:
    ``rev-<commit>``, at no cost. Any other directory gets ``blake3-<digest>`` over
    ``config.json`` and every weight file's name, size and contents. The digest is
    remembered in ``cache_dir`` (default ``~/.cache/kvstore/weights``) next to each
    file's size, mtime and inode, so a restart with unchanged files reads nothing;
    a file that changes in any of these is hashed again.
    """
    path = Path(model).resolve()
    if _SNAPSHOT.fullmatch(path.name) and path.parent.name == "snapshots":
        return f"rev-{path.name}"
    files = sorted(
        p for p in path.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name == "config.json")
    )
    if not files:
        raise FileNotFoundError(f"{path}: no config.json or weight files ({', '.join(WEIGHT_SUFFIXES)}) to identify")
    signature = [[p.name, st.st_size, st.st_mtime_ns, st.st_ino] for p in files if (st := p.stat())]
    memo = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "kvstore" / "weights"
    memo_file = memo / f"{blake3.blake3(str(path).encode()).hexdigest()[:32]}.json"
    try:
        saved = json.loads(memo_file.read_text())
        if saved.get("files") == signature and isinstance(saved.get("version"), str):
            return str(saved["version"])
    except (OSError, ValueError):
        pass
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    for p, (name, size, _, _) in zip(files, signature, strict=True):
        hasher.update(json.dumps([name, size]).encode())
        if size:
            hasher.update_mmap(p)
    version = f"blake3-{hasher.hexdigest()[:_DIGEST_CHARS]}"
    try:
        memo.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=memo, delete=False, suffix=".tmp") as tmp:
            json.dump({"model": str(path), "files": signature, "version": version}, tmp)
        os.replace(tmp.name, memo_file)  # atomic: concurrent engines never read half a file
    except OSError:
        pass  # a read-only home only costs the hash at the next start
    return version


def shard_name(
    name: str, *, tp_size: int = 1, tp_rank: int = 0, kv_replicas: int = 1, pp_size: int = 1, pp_rank: int = 0
) -> str:
    """The model name for one rank's shard of the KV: ranks holding different heads or layers never share keys.

    With tensor parallelism each rank holds ``num_kv_heads / tp`` heads, so two ranks
    have equal ``ModelSpec`` shapes but different bytes: the shard index keeps them
    apart. Ranks that replicate the same heads (``kv_replicas`` consecutive ranks,
    when TP exceeds the KV head count) share one shard. Pipeline stages hold different
    layers. A single shard keeps the plain name, so TP=1 keys match any other TP=1 engine.
    """
    if tp_size < 1 or kv_replicas < 1 or tp_size % kv_replicas or not 0 <= tp_rank < tp_size:
        raise ValueError(f"bad tensor-parallel layout: tp_size={tp_size} tp_rank={tp_rank} kv_replicas={kv_replicas}")
    if pp_size < 1 or not 0 <= pp_rank < pp_size:
        raise ValueError(f"bad pipeline layout: pp_size={pp_size} pp_rank={pp_rank}")
    shards = tp_size // kv_replicas
    if shards > 1:
        name = f"{name}.tp{shards}-{tp_rank // kv_replicas}"
    if pp_size > 1:
        name = f"{name}.pp{pp_size}-{pp_rank}"
    return name


def request_version(version: str, *, lora: str | None = None, cache_salt: str | None = None) -> str:
    """The version a request's KV is stored under: its own for a LoRA adapter or a cache salt.

    ``lora`` identifies the adapter's weights (its name and ``weights_version`` of its
    directory); ``cache_salt`` is the request's salt. Both enter the version as
    blake3 digests, so a salt is not stored in clear and entries made without the
    same adapter and salt are never hit.
    """
    if lora is not None:
        version += "+lora-" + blake3.blake3(b"kvstore/vllm/lora\x00" + lora.encode()).hexdigest()[:_DIGEST_CHARS]
    if cache_salt is not None:
        version += "+salt-" + blake3.blake3(b"kvstore/vllm/salt\x00" + cache_salt.encode()).hexdigest()[:_DIGEST_CHARS]
    return version


class RequestVersions:
    """Maps a vLLM request to the version its KV is stored under, or None to keep it away from the store."""

    def __init__(self, version: str) -> None:
        self._version = version
        self._adapters: dict[tuple[str, str], str] = {}

    def __call__(self, request: Any) -> str | None:
        if getattr(request, "mm_features", None) or getattr(request, "prompt_embeds", None) is not None:
            return None  # its KV depends on inputs the token ids do not show
        lora = getattr(request, "lora_request", None)
        adapter = None if lora is None else self._adapter(str(lora.lora_name), str(lora.lora_path))
        return request_version(self._version, lora=adapter, cache_salt=getattr(request, "cache_salt", None))

    def _adapter(self, name: str, path: str) -> str:
        """An adapter's identity: its name and the digest of its files (computed once per path)."""
        key = (name, path)
        if key not in self._adapters:
            try:
                self._adapters[key] = f"{name}:{weights_version(path)}"
            except OSError:  # not a local directory: its name and path are all there is
                self._adapters[key] = f"{name}:{path}"
        return self._adapters[key]
