"""The read path: find a prompt's chain of stored chunks, read and verify their data objects, report damage.

``lookup`` and every load go through ``ChunkReader``: one concurrent round of
HEADs finds how far the chain goes (and one LIST finds a saved partial chunk
when it stops short); each chunk is then read with one request (a whole load)
or two byte ranges (a layer-pipelined load: the index, the header and layer 0
first). Every layer's crc32c is checked before its bytes count as loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np

from kvstore._tasks import run_all
from kvstore._workers import in_worker
from kvstore.access import AccessRecorder
from kvstore.errors import FormatVersionError, IntegrityError, StoreUnavailableError
from kvstore.formats.codecs import Codec, get_codec
from kvstore.formats.keys import ChunkKey, chunk_keys, next_key
from kvstore.formats.layout import data_path, parse_tail_marker, tails_prefix
from kvstore.formats.shard import (
    CRC_BYTES,
    ShardHead,
    check_layer,
    decode_layer,
    head_bytes,
    index_bytes,
    parse_head,
)
from kvstore.requests import Requests
from kvstore.spec import ModelSpec

__all__ = ["ChunkReader", "Hit", "LayerBytes", "check_chunk_head", "chunk_codec", "read_head"]

logger = logging.getLogger("kvstore")

R = TypeVar("R")

_HEADER_GUESS = 256
"""Bytes of a chunk header besides its per-layer crcs, rounded up (the fields are of fixed size but the codec name)."""

LayerBytes = tuple[np.ndarray, np.ndarray]
"""One layer's destination in a load: flat uint8 views of the chunk's K rows and V rows."""


@dataclass(frozen=True, slots=True)
class Hit:
    """A chunk found present: its key and its data object's size."""

    key: ChunkKey
    size: int | None
    """None: not HEADed (a probed chain): only a whole read that needs no size may read it."""


def check_chunk_head(head: ShardHead, spec: ModelSpec, mid: bytes, key: ChunkKey, store_codec: str) -> Codec:
    """The codec of a data object whose header names exactly this chunk; IntegrityError otherwise.

    A codec this version does not know raises FormatVersionError (a newer writer, not damage).
    """
    h = head.header
    if h.key != key.digest or h.parent != key.parent or h.index != key.index:
        raise IntegrityError("data object belongs to another chunk")
    if h.model_id != mid or h.num_tokens != key.num_tokens:
        raise IntegrityError("data object does not match the model or the chunk's token count")
    return chunk_codec(head, spec, store_codec)


def chunk_codec(head: ShardHead, spec: ModelSpec, store_codec: str) -> Codec:
    """The codec a data object's header names, checked against the store's and the layer sizes it implies.

    Every chunk of a store has the store's codec: the one its array's ``zarr.json`` names.
    """
    codec = get_codec(head.header.codec, stored=True)
    if codec.name != store_codec:
        raise IntegrityError(f"the chunk's codec {codec.name!r} is not the store's {store_codec!r}")
    raw = 2 * head.header.num_tokens * spec.row_bytes + CRC_BYTES
    if codec.name == "none" and any(s.nbytes != raw for s in head.spans):
        raise IntegrityError("an uncompressed layer has the wrong size")
    return codec


class RangeReader(Protocol):
    async def get_range(self, key: str, start: int, end: int) -> bytes: ...


async def read_head(store: RangeReader, path: str, num_layers: int, size: int) -> ShardHead:
    """Read and parse a data object's index and header (one ranged GET); IntegrityError when damaged."""
    return parse_head(await store.get_range(path, 0, min(size, head_bytes(num_layers))), num_layers, size)


class ChunkReader:
    """Finds, reads and verifies chunks for one store; counts through its ``Requests``."""

    def __init__(
        self,
        requests: Requests,
        chunk_tokens: int,
        codec: str,
        *,
        verify: bool,
        repair: bool,
        access: AccessRecorder | None = None,
    ) -> None:
        self.requests = requests
        self.chunk_tokens = chunk_tokens
        self.codec = codec
        self.verify = verify
        self.repair = repair
        self.access = access

    # ------------------------------------------------------------------ finding the chain

    async def find_chain(self, spec: ModelSpec, mid: bytes, tokens: np.ndarray, *, probe: bool = False) -> list[Hit]:
        """The longest run of present chunks from the start (one round of HEADs, one LIST if it stops short).

        With ``probe``, where each HEAD is a request (S3, memory) a long chain is
        probed (``kvstore.probing``) and the hits between probes have no size; a
        chunk that turns out to be missing ends the load there.
        """

        async def size_of(key: ChunkKey) -> int | None:
            meta = await self.requests.head(data_path(mid, key.digest, key.num_tokens))
            return None if meta is None else meta.size

        keys = chunk_keys(spec, tokens, self.chunk_tokens, include_tail=True)
        paths = [data_path(mid, k.digest, k.num_tokens) for k in keys]
        # A store that reads into buffers needs every size (it plans each read from it): HEAD all.
        end, seen = await self.requests.find_first_missing(paths, probe=probe and not self.requests.reads_into_buffers)
        hits = [Hit(key, None if (m := seen.get(i)) is None else m.size) for i, key in enumerate(keys[:end])]
        if len(hits) < len(keys):
            tail = await self._find_saved_tail(mid, tokens, keys[len(hits)], size_of)
            if tail is not None:
                hits.append(Hit(*tail))
        if hits and self.access is not None:  # every lookup and load finds its chain here: the hit is a use
            self.access.record(mid, (h.key.digest for h in hits))
        return hits

    async def _find_saved_tail(
        self, mid: bytes, tokens: np.ndarray, missed: ChunkKey, probe: Callable[[ChunkKey], Awaitable[R | None]]
    ) -> tuple[ChunkKey, R] | None:
        """A saved partial chunk shorter than ``missed``, at its position, that ``tokens`` extend."""
        listing = await self.requests.list(tails_prefix(mid, missed.parent))
        lengths = sorted(
            {n for m in listing if (n := parse_tail_marker(m.key)) and n < missed.num_tokens}, reverse=True
        )
        candidates = [next_key(missed.parent, missed.index, tokens, missed.start, missed.start + n) for n in lengths]
        for key, value in zip(candidates, await run_all(probe(c) for c in candidates), strict=True):
            if value is not None:
                return key, value
        return None

    # ------------------------------------------------------------------ reading a chunk

    async def read_chunk(
        self,
        spec: ModelSpec,
        mid: bytes,
        hit: Hit,
        dest: list[LayerBytes],
        *,
        split: bool,
        progress: Callable[[int, int], None],
        before_rest: Callable[[], Awaitable[None]] | None = None,
    ) -> int:
        """Read, verify and decode chunk ``hit`` into ``dest`` (one (K, V) byte pair per layer): bytes read.

        ``progress(n, nbytes)`` is called whenever the first ``n`` layers are
        complete or more bytes were read (``nbytes`` so far, for this attempt).
        With ``split`` layer 0 comes from a first, small read so that it is usable
        early. Damage raises IntegrityError; a copy served by a cache tier is
        dropped and read again from the source first, so only the source's own
        damage is reported.
        """
        path = data_path(mid, hit.key.digest, hit.key.num_tokens)
        try:
            return await self._read(spec, mid, hit, path, dest, split, progress, before_rest)
        except IntegrityError:
            backend = self.requests.backend
            if not backend.has_cache_tiers:
                raise
        self.requests.counters.cache_rereads += 1
        await backend.drop_cached(path)
        return await self._read(spec, mid, hit, path, dest, split, progress, before_rest)

    async def _read(
        self,
        spec: ModelSpec,
        mid: bytes,
        hit: Hit,
        path: str,
        dest: list[LayerBytes],
        split: bool,
        progress: Callable[[int, int], None],
        before_rest: Callable[[], Awaitable[None]] | None,
    ) -> int:
        """One attempt at ``read_chunk``; ``progress(layers complete, bytes read so far)``; with ``split``,
        the read of the later layers waits for ``before_rest()``."""
        req, nl = self.requests, spec.num_layers
        if hit.size is None and req.reads_into_buffers:  # a bug, not damage: never "repair" it
            raise RuntimeError("a probed chunk has no size: a store that reads into buffers HEADs every chunk")
        size = hit.size or 0
        groups = [(0, 1), (1, nl)] if split and nl > 1 else [(0, nl)]
        if req.reads_into_buffers:  # a local file: one request reads the head and the first group of layers
            found: list[tuple[ShardHead, Callable[[int], None]]] = []

            def plan(head_data: bytes) -> tuple[int, list[memoryview]]:  # in the reading thread
                head = parse_head(head_data, nl, size)
                start, buffers, finish = self._plan(
                    head, check_chunk_head(head, spec, mid, hit.key, self.codec), dest, *groups[0]
                )
                found.append((head, finish))
                return start, buffers

            _, filled = await req.get_planned(path, min(size, head_bytes(nl)), plan, then=lambda n: found[0][1](n))
            head = found[0][0]
            got = head.data_start + filled
            progress(groups[0][1], got)
            for a, b in groups[1:]:
                if before_rest is not None:
                    await before_rest()
                start, buffers, finish = self._plan(
                    head, check_chunk_head(head, spec, mid, hit.key, self.codec), dest, a, b
                )
                got += await req.get_range_into(path, start, buffers, then=finish, priority=1)
                progress(b, got)
            return got
        if not split:  # one request for the whole chunk
            whole = memoryview(await req.get(path))
            progress(0, len(whole))
            head = parse_head(whole, nl, len(whole))
            codec = check_chunk_head(head, spec, mid, hit.key, self.codec)
            await in_worker(self._decode, codec, whole, 0, head, dest, 0, nl)
            progress(nl, len(whole))
            return len(whole)
        # The first range: the index, the header and layer 0 (the header's likely size, lz4/blosc's worst case).
        raw = 2 * hit.key.num_tokens * spec.row_bytes
        first_end = index_bytes(nl) + _HEADER_GUESS + 4 * nl + raw + raw // 255 + 16 + CRC_BYTES
        if hit.size is not None:
            first_end = min(hit.size, first_end)
        first = memoryview(await req.get_range(path, 0, first_end))
        progress(0, len(first))
        # Not HEADed (probed): a first range that stopped short found the object's end; else its index tells.
        known = hit.size if hit.size is not None else (len(first) if len(first) < first_end else None)
        head = parse_head(first, nl, known)
        codec = check_chunk_head(head, spec, mid, hit.key, self.codec)
        ready = 0
        while ready < nl and head.spans[ready].end <= len(first):
            ready += 1
        await in_worker(self._decode, codec, first, 0, head, dest, 0, ready)
        progress(ready, len(first))
        if ready == nl:
            return len(first)
        if before_rest is not None and ready:  # (a first range short of layer 0 must not wait for its own layer 0)
            await before_rest()
        later = await req.get_range(path, len(first), head.size, priority=1)
        whole = memoryview(bytes(first) + later)  # layers may lie anywhere after the first range
        progress(ready, len(whole))
        await in_worker(self._decode, codec, whole, 0, head, dest, ready, nl)
        progress(nl, len(first) + len(later))
        return len(first) + len(later)

    def _plan(
        self, head: ShardHead, codec: Codec, dest: list[LayerBytes], a: int, b: int
    ) -> tuple[int, list[memoryview], Callable[[int], None]]:
        """Where layers ``[a, b)`` are read to: ``(start offset, buffers, finish(filled))``.

        Uncompressed, contiguous layers are scattered straight into their
        destinations (K, V, and a 4-byte slot for the crc32c); anything else into
        one scratch buffer that ``finish`` decodes. ``finish`` runs in the reading
        thread, while the bytes are still in the CPU cache: sizes, the header's
        crcs, and with ``verify`` the crc32c of every layer.
        """
        start, end = min(x.offset for x in head.spans[a:b]), max(x.end for x in head.spans[a:b])
        if codec.name != "none" or not head.contiguous():
            scratch = np.empty(end - start, np.uint8)

            def decode(filled: int) -> None:
                if filled != end - start:
                    raise IntegrityError(f"data object ended after {start + filled} of {head.size} bytes")
                self._decode(codec, scratch.data, start, head, dest, a, b)

            return start, [scratch.data], decode
        crcs = np.empty((b - a, CRC_BYTES), np.uint8)
        buffers: list[memoryview] = []
        for i in range(a, b):
            kb, vb = dest[i]
            buffers += [kb.data, vb.data, crcs[i - a].data]
        expected = np.frombuffer(head.header.layer_crcs[CRC_BYTES * a : CRC_BYTES * b], np.uint8)

        def check(filled: int) -> None:
            if filled != end - start:
                raise IntegrityError(f"data object ended after {start + filled} of {head.size} bytes")
            if not np.array_equal(crcs.reshape(-1), expected):
                raise IntegrityError("layer checksum differs from the header's")
            if self.verify:
                for (kb, vb), crc in zip(dest[a:b], crcs, strict=True):
                    check_layer([kb, vb], crc)

        return start, buffers, check

    def _decode(
        self, codec: Codec, data: memoryview, base: int, head: ShardHead, dest: list[LayerBytes], a: int, b: int
    ) -> None:
        """Decode layers ``[a, b)`` from ``data``, which holds the object's bytes from offset ``base``."""
        for i in range(a, b):
            span = head.spans[i]
            if span.offset < base or span.end - base > len(data):
                raise IntegrityError(f"data object is shorter than its index says ({len(data) + base} bytes)")
            stored = data[span.offset - base : span.end - base]
            decode_layer(codec, stored, dest[i], head.header.layer_crc(i), verify=self.verify)

    # ------------------------------------------------------------------ damage

    async def report_damage(self, spec: ModelSpec, mid: bytes, key: ChunkKey, exc: BaseException | None) -> None:
        """Count and log a damaged chunk; with ``repair`` delete its data object so the next save rewrites it.

        The damage was seen in the source's own bytes (``read_chunk`` re-reads
        a cache tier's copy from the source first), so the delete acts there.
        """
        if isinstance(exc, FormatVersionError):  # a newer writer's chunk: a miss, left alone
            logger.warning("chunk %s of %s was written in another format: %s", key.hex, spec.label, exc)
            return
        self.requests.counters.chunks_damaged += 1
        logger.warning("damaged chunk %s (#%d of %s): %s", key.hex, key.index, spec.label, exc)
        if not self.repair:
            return
        try:
            await self.requests.delete([data_path(mid, key.digest, key.num_tokens)])
        except StoreUnavailableError as err:
            logger.warning("could not retire damaged chunk %s: %s", key.hex, err)
