"""Verification: re-read every chunk's data object and check its index, header, sizes and checksums.

A damaged chunk is reported; with ``repair`` its data object is deleted (a
concurrent reader sees a miss, never a half-deleted chunk) and the next save of
that prefix writes it again. Only what docs/FORMAT.md defines as damage counts,
a header naming another codec than the store's included. An array's
``zarr.json`` (one per model and chunk length) is not part of kvstore's format,
so a missing or unreadable one, or one that decodes otherwise than the store
writes it (shape, data type or codec chain), is reported apart
(``metadata_problems``) and, with ``repair``, written again; one that merely
differs in settings or additions (another writer's version) is left alone.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvstore._tasks import task_group
from kvstore._workers import in_worker
from kvstore.errors import FormatVersionError, IntegrityError, InvalidInputError, ObjectNotFoundError
from kvstore.formats.layout import (
    ChunkObject,
    key_coords,
    metadata_path,
    model_chunks_prefix,
    parse_chunk_object,
    zarr_array_metadata,
)
from kvstore.formats.shard import ShardHead, decode_layer, parse_head
from kvstore.gc.report import GCProgress
from kvstore.reading import chunk_codec
from kvstore.registry import read_registry, read_root_record
from kvstore.results import ModelInfo
from kvstore.storage import ObjectStore

__all__ = ["Damage", "VerifyReport", "verify_store"]


@dataclass(frozen=True, slots=True)
class Damage:
    """One damaged chunk: its model version, key (hex; the data object's path when its header cannot tell) and
    what is wrong."""

    model: str
    key: str
    problem: str


@dataclass(slots=True)
class VerifyReport:
    """What ``verify_store`` checked and found. ``ok`` means no damaged chunk."""

    url: str
    models: list[str] = field(default_factory=list)
    chunks_checked: int = 0
    bytes_read: int = 0
    damaged: list[Damage] = field(default_factory=list)
    repaired: int = 0
    metadata_problems: int = 0
    metadata_rewritten: int = 0
    skipped_other_format: int = 0
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.damaged

    def as_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "models": self.models,
            "chunks_checked": self.chunks_checked,
            "chunks_damaged": len(self.damaged),
            "chunks_repaired": self.repaired,
            "skipped_other_format": self.skipped_other_format,
            "metadata_problems": self.metadata_problems,
            "metadata_rewritten": self.metadata_rewritten,
            "bytes_read": self.bytes_read,
            "damaged": [{"model": d.model, "key": d.key, "problem": d.problem} for d in self.damaged],
            "elapsed_seconds": round(self.elapsed, 3),
        }


class _Skip(Exception):
    """The chunk vanished or uses another format version: not ours to judge."""


async def verify_store(
    backend: ObjectStore,
    *,
    models: list[tuple[str, str]] | None = None,
    repair: bool = False,
    concurrency: int = 16,
    progress: GCProgress | None = None,
) -> VerifyReport:
    """Check every chunk (data object) of the given ``(name, version)`` models (default: all of them)."""
    started = time.monotonic()
    root = await read_root_record(backend)
    registry = await read_registry(backend)
    chosen = list(registry.models)
    if models is not None:
        wanted = set(models)
        chosen = [m for m in registry.models if (m.spec.name, m.spec.version) in wanted]
        missing = wanted - {(m.spec.name, m.spec.version) for m in chosen}
        if missing:
            names = ", ".join(f"{n}@{v}" for n, v in sorted(missing))
            raise InvalidInputError(f"no such model version in {backend.url}: {names}")
    report = VerifyReport(backend.url, models=[m.label for m in chosen])
    limit = asyncio.Semaphore(concurrency)
    if progress is not None:
        progress.start("verify", None)

    async def check(info: ModelInfo, parsed: ChunkObject, data_key: str) -> None:
        try:
            key, problem = await _check_chunk(backend, info, root.chunk_tokens, root.codec, parsed, data_key, report)
        except _Skip:
            return
        finally:
            limit.release()
            if progress is not None:
                progress.advance("verify", 1)
        report.chunks_checked += 1
        if problem is None:
            return
        report.damaged.append(Damage(info.label, key, problem))
        if repair:
            await backend.delete([data_key])  # readers now see a miss; the next save writes it again
            report.repaired += 1

    arrays: list[tuple[ModelInfo, set[int]]] = []  # the chunk lengths seen per model: its arrays
    async with task_group() as tg:
        for info in chosen:
            lengths: set[int] = set()
            arrays.append((info, lengths))
            async for meta in backend.list(model_chunks_prefix(info.model_id)):
                parsed = parse_chunk_object(meta.key)
                if parsed is None or parsed.kind != "data":
                    continue
                lengths.add(parsed.num_tokens)
                await limit.acquire()
                tg.create_task(check(info, parsed, meta.key))
    for info, lengths in arrays:
        for n in sorted(lengths):
            await _check_metadata(backend, info, n, root.codec, report, repair)
    if progress is not None:
        progress.finish("verify")
    report.damaged.sort(key=lambda d: (d.model, d.key))
    report.elapsed = time.monotonic() - started
    return report


async def _check_chunk(
    backend: ObjectStore,
    info: ModelInfo,
    chunk_tokens: int,
    codec_name: str,
    parsed: ChunkObject,
    data_key: str,
    report: VerifyReport,
) -> tuple[str, str | None]:
    """(the chunk's key hex, or its path; None when the chunk is intact, else the first problem found)."""
    spec = info.spec
    try:
        data = memoryview(await backend.get(data_key))
    except ObjectNotFoundError:
        raise _Skip from None
    report.bytes_read += len(data)
    try:
        head = parse_head(data, spec.num_layers, len(data))
        codec = chunk_codec(head, spec, codec_name)
    except FormatVersionError:
        report.skipped_other_format += 1
        raise _Skip from None
    except IntegrityError as exc:
        return data_key, f"data object: {exc}"
    h = head.header
    if h.model_id != info.model_id or h.num_tokens != parsed.num_tokens or key_coords(h.key) != parsed.coords:
        return data_key, "data object belongs to another chunk or model"
    if h.num_tokens > chunk_tokens:
        return h.key.hex(), f"data object says {h.num_tokens} tokens, more than a chunk holds ({chunk_tokens})"
    try:
        await in_worker(_check_layers, codec, data, head, 2 * h.num_tokens * spec.row_bytes)
    except IntegrityError as exc:
        return h.key.hex(), str(exc)
    return h.key.hex(), None


def _check_layers(codec: Any, data: memoryview, head: ShardHead, raw: int) -> None:
    scratch = np.empty(raw, np.uint8)
    half = raw // 2
    for layer, span in enumerate(head.spans):
        try:
            out = (scratch[:half], scratch[half:])
            decode_layer(codec, data[span.offset : span.end], out, head.header.layer_crc(layer), verify=True)
        except IntegrityError as exc:
            raise IntegrityError(f"layer {layer}: {exc}") from None


async def _check_metadata(
    backend: ObjectStore, info: ModelInfo, num_tokens: int, codec: str, report: VerifyReport, repair: bool
) -> None:
    """An array's zarr.json must exist, be JSON and decode as the store writes it (shape, data type, the
    store's codec chain) for stock zarr to read its chunks."""
    path = metadata_path(info.model_id, num_tokens)
    expected = zarr_array_metadata(info.spec, num_tokens, codec)
    try:
        if _decoding(json.loads(await backend.get(path))) == _decoding(json.loads(expected)):
            return
    except (ObjectNotFoundError, ValueError):
        pass
    report.metadata_problems += 1
    if repair:
        await backend.put(path, expected)
        report.metadata_rewritten += 1


def _decoding(meta: Any) -> Any:
    """What decides how zarr decodes an array: its shape, data type and codec chain (names, not settings)."""
    if not isinstance(meta, dict):
        return None

    def names(codecs: Any) -> Any:
        if not isinstance(codecs, list):
            return None
        out = []
        for codec in codecs:
            config = codec.get("configuration", {}) if isinstance(codec, dict) else None
            if not isinstance(config, dict):
                return None
            out.append((codec.get("name"), names(config.get("codecs")), config.get("chunk_shape")))
        return out

    return meta.get("shape"), meta.get("data_type"), names(meta.get("codecs"))
