"""Verification: re-read every committed chunk and check its records, structure, sizes and checksums.

A damaged chunk is reported; with ``repair`` it is deleted (commit record first,
so a concurrent reader sees a miss, never a half-deleted chunk) and the next
save of that prefix writes it again.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import blake3

from kvstore._tasks import task_group
from kvstore.errors import FormatVersionError, IntegrityError, InvalidInputError, ObjectNotFoundError
from kvstore.formats.codecs import get_codec
from kvstore.formats.layout import (
    COMMIT_NAME,
    ZARR_JSON,
    layer_path,
    model_chunks_prefix,
    zarr_array_metadata,
)
from kvstore.formats.records import CommitRecord
from kvstore.gc.marksweep import split_chunk_key
from kvstore.gc.report import GCProgress
from kvstore.registry import read_registry, read_root_record
from kvstore.results import ModelInfo
from kvstore.storage import ObjectStore

__all__ = ["Damage", "VerifyReport", "verify_store"]


@dataclass(frozen=True, slots=True)
class Damage:
    """One damaged chunk: its model version, key (hex) and what is wrong."""

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
    """Check every committed chunk of the given ``(name, version)`` models (default: all of them)."""
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

    async def check(info: ModelInfo, khex: str, commit_key: str) -> None:
        try:
            problem = await _check_chunk(backend, info, root.chunk_tokens, khex, commit_key, report)
        except _Skip:
            return
        finally:
            limit.release()
            if progress is not None:
                progress.advance("verify", 1)
        report.chunks_checked += 1
        if problem is None:
            return
        report.damaged.append(Damage(info.label, khex, problem))
        if repair:
            prefix = commit_key[: -len(COMMIT_NAME)]
            await backend.delete([commit_key])  # first: readers now see a miss
            others = [prefix + ZARR_JSON, *(layer_path(prefix, i) for i in range(info.spec.num_layers))]
            await backend.delete(others)
            report.repaired += 1

    async with task_group() as tg:
        for info in chosen:
            async for meta in backend.list(model_chunks_prefix(info.model_id)):
                parts = split_chunk_key(meta.key)
                if parts is None or parts[2] != COMMIT_NAME:
                    continue
                await limit.acquire()
                tg.create_task(check(info, parts[1], meta.key))
    if progress is not None:
        progress.finish("verify")
    report.damaged.sort(key=lambda d: (d.model, d.key))
    report.elapsed = time.monotonic() - started
    return report


async def _get(backend: ObjectStore, key: str) -> bytes:
    try:
        return await backend.get(key)
    except ObjectNotFoundError:
        raise _Skip from None


async def _check_chunk(
    backend: ObjectStore, info: ModelInfo, chunk_tokens: int, khex: str, commit_key: str, report: VerifyReport
) -> str | None:
    """None when the chunk is intact, else a one-line description of the first problem found."""
    prefix = commit_key[: -len(COMMIT_NAME)]
    spec = info.spec
    try:
        rec = CommitRecord.from_msgpack(await _get(backend, commit_key))
        codec = get_codec(rec.codec, stored=True)
    except FormatVersionError:
        report.skipped_other_format += 1
        raise _Skip from None
    except IntegrityError as exc:
        return f"commit record: {exc}"
    if rec.key.hex() != khex or rec.model_id != info.model_id:
        return "commit record belongs to another chunk or model"
    if len(rec.layer_sizes) != spec.num_layers:
        return f"commit record lists {len(rec.layer_sizes)} layers, the model has {spec.num_layers}"
    if rec.num_tokens > chunk_tokens:
        return f"commit record says {rec.num_tokens} tokens, more than a chunk holds ({chunk_tokens})"
    try:
        meta = json.loads(await backend.get(prefix + ZARR_JSON))
    except ObjectNotFoundError:
        return "zarr.json is missing"
    except ValueError:
        return "zarr.json is not valid JSON"
    if meta != json.loads(zarr_array_metadata(spec, rec.num_tokens, rec.codec)):
        return "zarr.json does not match the model and commit record"
    raw_size = 2 * rec.num_tokens * spec.row_bytes
    for layer, (size, digest) in enumerate(zip(rec.layer_sizes, rec.layer_digests, strict=True)):
        try:
            data = await backend.get(layer_path(prefix, layer))
        except ObjectNotFoundError:
            return f"layer {layer} object is missing"
        report.bytes_read += len(data)
        if len(data) != size:
            return f"layer {layer} object is {len(data)} bytes, the commit record says {size}"
        try:
            ok = await asyncio.to_thread(_digest_matches, codec.decode, data, raw_size, digest)
        except IntegrityError as exc:
            return f"layer {layer}: {exc}"
        if not ok:
            return f"layer {layer} checksum mismatch"
    return None


def _digest_matches(decode: Any, data: bytes, raw_size: int, digest: bytes) -> bool:
    decoded = decode(data, raw_size)
    return bool(blake3.blake3(decoded).digest() == digest)
