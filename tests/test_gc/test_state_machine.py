"""Property: whatever saves, loads, retirements, damage, crashed writers and evictions came before, a GC
deletes nothing reachable from a live model version, and (with no grace) everything else under chunks/;
an eviction never deletes a reachable chunk used within the grace (nor what it depends on); and a load
never returns wrong data.

Uses are stamped by a clock of the machine's own (``kvstore.access.wall_clock``), 100 s per step and
far ahead of the objects' real mtimes, so only the access records tell what was used recently."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from typing import Any

import torch
from gc_helpers import put_raw, run_gc_at
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import kvstore
import kvstore.access
from kvstore.formats.keys import chunk_keys, model_id, normalize_tokens
from kvstore.formats.layout import data_path, model_chunks_prefix, parse_chunk_object, tail_marker_path
from kvstore.storage import open_object_store

CHUNK = 4
VERSIONS = ("v1", "v2", "v3")
BASES = [list(range(500 * b, 500 * b + 20)) for b in range(2)]
EVICT_GRACE = 250.0  # the last two steps' uses


def _spec(version: str) -> kvstore.ModelSpec:
    return kvstore.ModelSpec("sm", version, num_layers=1, num_kv_heads=1, head_dim=4, dtype=torch.float16)


def _kv(base: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(base)
    k, v = (torch.randn(20, 1, 4, generator=gen).half() for _ in range(2))
    return [(k[:n], v[:n])]


class GCMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="kvgc-sm-")
        self.url = f"{self.dir}/kv"
        self.saved: dict[str, set[tuple[int, int]]] = {v: set() for v in VERSIONS}
        self.retired: set[str] = set()
        self.dirty = False  # set by rules that make garbage: the next invariant check runs a GC
        self.clock = time.time() + 10_000
        self.uses: dict[tuple[str, bytes], float] = {}  # (version, chunk key) -> last recorded use
        self._wall_clock = kvstore.access.wall_clock
        kvstore.access.wall_clock = lambda: self.clock

    def teardown(self) -> None:
        kvstore.access.wall_clock = self._wall_clock
        shutil.rmtree(self.dir, ignore_errors=True)

    def _used(self, version: str, tokens: list[int]) -> None:
        for key in chunk_keys(_spec(version), normalize_tokens(tokens), CHUNK):
            self.uses[(version, key.digest)] = self.clock

    def _run(self, coro: Any) -> Any:
        return asyncio.run(coro)

    @rule(version=st.sampled_from(VERSIONS), base=st.integers(0, 1), n=st.integers(1, 20))
    def save(self, version: str, base: int, n: int) -> None:
        self.clock += 100

        async def go() -> None:
            async with kvstore.open(self.url, chunk_tokens=CHUNK) as store:
                await store.save_prefix(_spec(version), BASES[base][:n], _kv(base, n))

        if version in self.retired:
            try:
                self._run(go())
            except kvstore.ModelRetiredError:
                return
            raise AssertionError("a save under a retired version was accepted")
        self._run(go())
        self.saved[version].add((base, n))
        self._used(version, BASES[base][:n])

    @precondition(lambda self: any(self.saved.values()))
    @rule(data=st.data())
    def use(self, data: st.DataObject) -> None:
        """Load a saved prompt (or a prefix of it): a recorded use of the chunks it hits."""
        self.clock += 100
        version = data.draw(st.sampled_from([v for v in VERSIONS if self.saved[v]]))
        base, n = data.draw(st.sampled_from(sorted(self.saved[version])))
        n = data.draw(st.integers(1, n))

        async def go() -> int:
            async with kvstore.open(self.url) as store:
                hit = await store.load_prefix(_spec(version), BASES[base][:n])
                return hit.num_tokens

        got = self._run(go())
        if version not in self.retired:
            self._used(version, BASES[base][:got])

    @precondition(lambda self: any(self.saved.values()))
    @rule(share=st.sampled_from([0.0, 0.3, 0.7, None]), idle=st.sampled_from([None, 150.0, 450.0]))
    def evict(self, share: float | None, idle: float | None) -> None:
        """Evict down to a share of the chunk bytes and/or what was idle: never a chunk used within the grace."""
        if share is None and idle is None:
            return
        now = self.clock + 1

        async def present() -> dict[str, int]:
            backend = await open_object_store(self.url)
            out = {m.key: m.size async for m in backend.list("chunks/")}
            await backend.close()
            return out

        before = self._run(present())
        budget = None if share is None else int(sum(before.values()) * share)
        report = self._run(run_gc_at(self.url, None, grace=EVICT_GRACE, now=now, max_bytes=budget, max_idle=idle))
        assert report.ok
        after = self._run(present())
        for version in VERSIONS:
            if version in self.retired:
                continue
            spec, mid = _spec(version), model_id(_spec(version))
            for base, n in self.saved[version]:
                keys = chunk_keys(spec, normalize_tokens(BASES[base][:n]), CHUNK)
                for i, key in enumerate(keys):
                    if data_path(mid, key.digest, key.num_tokens) not in before:
                        break
                    if self.uses.get((version, key.digest), 0.0) >= now - EVICT_GRACE:
                        for k in keys[: i + 1]:  # it, and the whole chain it depends on
                            path = data_path(mid, k.digest, k.num_tokens)
                            assert path in after, f"evicted {path}, used within the grace"
        self.dirty = True

    @precondition(lambda self: any(self.saved.values()))
    @rule(version=st.sampled_from(VERSIONS))
    def retire(self, version: str) -> None:
        if not self.saved[version] and version not in self.retired:
            return

        async def go() -> None:
            async with kvstore.open(self.url) as store:
                await store.retire("sm", version)

        self._run(go())
        self.retired.add(version)
        self.dirty = True

    @precondition(lambda self: any(self.saved.values()))
    @rule(data=st.data())
    def damage(self, data: st.DataObject) -> None:
        """Lose one data object (as a repair after a failed checksum would)."""
        version = data.draw(st.sampled_from([v for v in VERSIONS if self.saved[v]]))
        base, n = data.draw(st.sampled_from(sorted(self.saved[version])))
        keys = chunk_keys(_spec(version), normalize_tokens(BASES[base][:n]), CHUNK)
        key = data.draw(st.sampled_from(keys))

        async def go() -> None:
            backend = await open_object_store(self.url)
            await backend.delete([data_path(model_id(_spec(version)), key.digest, key.num_tokens)])
            await backend.close()

        self._run(go())
        self.dirty = True

    @rule(
        version=st.sampled_from(VERSIONS),
        junk=st.binary(min_size=32, max_size=32),
        n=st.integers(1, CHUNK),
        temp=st.booleans(),
    )
    def crashed_writer(self, version: str, junk: bytes, n: int, temp: bool) -> None:
        """A data object cut short (or, on a local directory, the temporary file of an interrupted write)."""
        path = data_path(model_id(_spec(version)), junk, n) + (".tmp-" + "de" * 16 if temp else "")
        self._run(put_raw(self.url, None, {path: b"partial"}))
        self.dirty = True

    def _reachable(self) -> set[str]:
        """Oracle: the data object (and tail marker) of every chunk of a live version whose whole chain has
        data objects, and the arrays' zarr.json of live versions."""

        async def go() -> set[str]:
            backend = await open_object_store(self.url)
            keep: set[str] = set()
            for version in VERSIONS:
                if version in self.retired:
                    continue
                spec, mid = _spec(version), model_id(_spec(version))
                async for meta in backend.list(model_chunks_prefix(mid)):
                    parsed = parse_chunk_object(meta.key)
                    if parsed is not None and parsed.kind == "metadata":
                        keep.add(meta.key)
                for base, n in self.saved[version]:
                    for key in chunk_keys(spec, normalize_tokens(BASES[base][:n]), CHUNK):
                        path = data_path(mid, key.digest, key.num_tokens)
                        if await backend.head(path) is None:
                            break
                        keep.add(path)
                        if key.num_tokens < CHUNK:
                            keep.add(tail_marker_path(mid, key.parent, key.num_tokens))
            await backend.close()
            return keep

        result: set[str] = self._run(go())
        return result

    @rule()
    def gc(self) -> None:
        self._check_gc()

    @invariant()
    def gc_after_garbage(self) -> None:
        if self.dirty:
            self._check_gc()

    def _check_gc(self) -> None:
        self.dirty = False
        if not any(self.saved.values()):
            return
        expected = self._reachable()

        async def snapshot() -> dict[str, bytes]:
            backend = await open_object_store(self.url)
            out = {m.key: await backend.get(m.key) async for m in backend.list("chunks/")}
            await backend.close()
            return out

        before = self._run(snapshot())
        report = self._run(run_gc_at(self.url, None, grace=0, now=time.time() + 5))
        after = self._run(snapshot())
        assert report.ok
        missing = expected - set(after)
        assert not missing, f"GC deleted reachable objects: {sorted(missing)[:5]}"
        assert all(after[k] == before[k] for k in expected)
        extra = set(after) - expected
        assert not extra, f"GC left garbage: {sorted(extra)[:5]}"

    @invariant()
    def live_prompts_load_what_is_reachable(self) -> None:
        async def go() -> None:  # checking is not a use: it must not protect anything from eviction
            async with kvstore.open(self.url, chunk_tokens=CHUNK, record_access=False) as store:
                for version in VERSIONS:
                    if version in self.retired:
                        continue
                    for base, n in self.saved[version]:
                        hit = await store.load_prefix(_spec(version), BASES[base][:n])
                        want = _kv(base, hit.num_tokens)
                        for (k, v), (wk, wv) in zip(hit.kv, want, strict=True):
                            assert torch.equal(k.view(torch.int16), wk.view(torch.int16))
                            assert torch.equal(v.view(torch.int16), wv.view(torch.int16))

        if any(self.saved.values()):
            self._run(go())


TestGCStateMachine = GCMachine.TestCase
TestGCStateMachine.settings = settings(
    max_examples=30, stateful_step_count=15, deadline=None, suppress_health_check=list(HealthCheck)
)
