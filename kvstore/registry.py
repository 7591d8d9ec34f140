"""The model registry: model records and retirement records under ``models/``.

Both kinds of record are immutable and written create-only, so any number of
processes may write them concurrently: a model is live from its first save
until a retirement record appears beside its model record, and retired forever
after (retirement is final; a new weights release gets a new version).
"""

from __future__ import annotations

import getpass
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from kvstore._tasks import run_all
from kvstore.errors import FormatVersionError, IntegrityError, InvalidInputError, ObjectNotFoundError, StoreConfigError
from kvstore.formats.layout import MODELS_DIR, ROOT_RECORD, retirement_record_path
from kvstore.formats.records import ModelRecord, RetirementRecord, RootRecord
from kvstore.results import ModelInfo
from kvstore.storage import ObjectStore

__all__ = ["Registry", "default_retired_by", "read_registry", "read_root_record", "retire_models"]


async def read_root_record(backend: ObjectStore) -> RootRecord:
    """The store's root record; StoreConfigError when there is no store at all."""
    try:
        return RootRecord.from_msgpack(await backend.get(ROOT_RECORD))
    except ObjectNotFoundError:
        raise StoreConfigError(f"{backend.url}: no kvstore store here (no {ROOT_RECORD})") from None


logger = logging.getLogger("kvstore")

_RETIRED_SUFFIX = ".retired.msgpack"
_RECORD_SUFFIX = ".msgpack"


@dataclass(frozen=True, slots=True)
class Registry:
    """Every model version in a store; ``unreadable`` maps model ids to why their records failed to read.

    Chunks of an unreadable model (damaged record, newer format) are neither live
    nor retired: the GC leaves them alone.
    """

    models: tuple[ModelInfo, ...]
    unreadable: dict[bytes, str] = field(default_factory=dict)

    @property
    def live_ids(self) -> frozenset[bytes]:
        return frozenset(m.model_id for m in self.models if not m.retired)

    def by_id(self) -> dict[bytes, ModelInfo]:
        return {m.model_id: m for m in self.models}

    def find(self, name: str, version: str) -> list[ModelInfo]:
        return [m for m in self.models if m.spec.name == name and m.spec.version == version]


def _model_id_of(key: str) -> tuple[bytes, bool] | None:
    """(model id, is a retirement record) for a key under ``models/``, or None for other objects."""
    name = key.rsplit("/", 1)[-1]
    retired = name.endswith(_RETIRED_SUFFIX)
    stem = name.removesuffix(_RETIRED_SUFFIX) if retired else name.removesuffix(_RECORD_SUFFIX)
    if stem == name or len(stem) != 32:
        return None
    try:
        return bytes.fromhex(stem), retired
    except ValueError:
        return None


async def read_registry(
    backend: ObjectStore,
    *,
    listing: list[str] | None = None,
    get: Callable[[str], Awaitable[bytes]] | None = None,
) -> Registry:
    """Read every model and retirement record (one listing, one GET per record, concurrently).

    ``listing`` (the keys under ``models/``) and ``get`` let a caller route the
    requests through its own limits and counters.
    """
    if listing is None:
        listing = [meta.key async for meta in backend.list(MODELS_DIR + "/")]
    keys = [(key, *parsed) for key in listing if (parsed := _model_id_of(key)) is not None]
    read = get or backend.get

    async def fetch(key: str) -> bytes | None:
        try:
            return await read(key)
        except ObjectNotFoundError:  # deleted between listing and reading
            return None

    blobs = await run_all(fetch(k) for k, _, _ in keys)
    records: dict[bytes, ModelRecord] = {}
    retirements: dict[bytes, RetirementRecord] = {}
    unreadable: dict[bytes, str] = {}
    for (key, mid, retired), data in zip(keys, blobs, strict=True):
        if data is None:
            continue
        try:
            if retired:
                ret = RetirementRecord.from_msgpack(data)
                _check_id(ret.model_id, mid, key)
                retirements[mid] = ret
            else:
                rec = ModelRecord.from_msgpack(data)
                _check_id(rec.model_id, mid, key)
                records[mid] = rec
        except (IntegrityError, FormatVersionError) as exc:
            logger.warning("unreadable model registry record %s: %s", key, exc)
            unreadable[mid] = f"{key}: {exc}"
    models = [_info(rec, retirements.get(mid)) for mid, rec in records.items() if mid not in unreadable]
    models.sort(key=lambda m: (m.spec.name, m.spec.version, m.model_id))
    return Registry(tuple(models), unreadable)


def _info(rec: ModelRecord, ret: RetirementRecord | None) -> ModelInfo:
    if ret is None:
        return ModelInfo(rec.model_id, rec.spec, rec.created)
    return ModelInfo(rec.model_id, rec.spec, rec.created, ret.retired_at, ret.retired_by, ret.reason)


def _check_id(record_id: bytes, path_id: bytes, key: str) -> None:
    if record_id != path_id:
        raise IntegrityError(f"record at {key} names model {record_id.hex()}")


def default_retired_by() -> str:
    """``user@host`` of this process, for retirement records."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


async def retire_models(
    backend: ObjectStore, registry: Registry, name: str, version: str, *, by: str | None, reason: str | None
) -> list[ModelInfo]:
    """Retire every model record called ``name@version``; already retired ones keep their first record."""
    targets = registry.find(name, version)
    if not targets:
        known = ", ".join(sorted({m.label for m in registry.models})) or "none"
        raise InvalidInputError(f"no model {name}@{version} in this store (known: {known})")
    who = by if by is not None else default_retired_by()
    for text, what in ((who, "by"), (reason, "reason")):
        if text is not None and (not isinstance(text, str) or len(text) > 4096):
            raise InvalidInputError(f"retire: {what} must be a string of at most 4096 characters")
    return await run_all(_retire_one(backend, m, who, reason) for m in targets)


async def _retire_one(backend: ObjectStore, model: ModelInfo, by: str, reason: str | None) -> ModelInfo:
    if model.retired:
        return model
    record = RetirementRecord(model.model_id, retired_by=by, reason=reason)
    path = retirement_record_path(model.model_id)
    if not await backend.put(path, record.to_msgpack(), create_only=True):
        record = RetirementRecord.from_msgpack(await backend.get(path))  # another process retired it first
    return ModelInfo(model.model_id, model.spec, model.created, record.retired_at, record.retired_by, record.reason)
