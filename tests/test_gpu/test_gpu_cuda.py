"""On a CUDA device: pinned pool, bit-exact copies, ordering with torch's streams, store round trips.

Every test runs twice, through cupy (skipped when it is not installed) and
through the torch-only fallback. Marked ``gpu``; the module is skipped without
a CUDA device. Run: ``pytest -m gpu tests/test_gpu``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from _gpu_wait import until

import kvstore
from kvstore.gpu import Stagings
from kvstore.gpu.cupy_engine import load_cupy
from kvstore.storage import ObjectStore, open_object_store
from kvstore.store import KVStore, StoreOptions

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

CUDA = torch.device("cuda", torch.cuda.current_device())
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2]
SPIN = 50_000_000  # GPU clock cycles of torch.cuda._sleep: tens of ms, long enough for a copy to overtake it
KV = list[tuple[torch.Tensor, torch.Tensor]]


@pytest.fixture(params=["cupy", "torch"])
def stagings(request: pytest.FixtureRequest) -> Stagings:
    """A store's stagings through cupy or through the torch-only fallback."""
    if request.param == "cupy":
        pytest.importorskip("cupy", reason="cupy is not installed: pip install 'kvstore[gpu]'")
        if load_cupy() is None:
            pytest.skip("cupy cannot use this CUDA driver")
        return Stagings(256 << 20)
    return Stagings(256 << 20, load_cupy=lambda: None)


def is_pinned(t: torch.Tensor) -> bool:
    """Page-locked as the driver sees it, whichever allocator made it (torch's own check may know only its own)."""
    cupy = load_cupy()
    if cupy is None:
        return t.is_pinned()
    runtime = cupy.cuda.runtime
    return bool(runtime.pointerGetAttributes(t.data_ptr()).type == runtime.memoryTypeHost)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(-1).view(torch.uint8)


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Every bit pattern, NaNs and infinities included: a copy that converts anything shows."""
    gen = torch.Generator().manual_seed(seed)
    nbytes = dtype.itemsize
    raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * nbytes), dtype=torch.uint8, generator=gen)
    return raw.view(dtype)


def assert_same(actual: Sequence[tuple[torch.Tensor, torch.Tensor]], expected: Sequence[Any]) -> None:
    assert len(actual) == len(expected)
    for (k, v), (ek, ev) in zip(actual, expected, strict=True):
        for got, want in ((k, ek), (v, ev)):
            assert got.dtype == want.dtype
            assert got.shape == want.shape
            assert torch.equal(bits(got), bits(want))


def spec_for(dtype: torch.dtype, layers: int = 4) -> kvstore.ModelSpec:
    return kvstore.ModelSpec("gpu-test", "v1", layers, 2, 64, dtype)


def kv_for(spec: kvstore.ModelSpec, tokens: int, seed: int = 0) -> KV:
    shape = (tokens, spec.num_kv_heads, spec.head_dim)
    return [
        (random_bits(shape, spec.dtype, seed + 2 * i), random_bits(shape, spec.dtype, seed + 2 * i + 1))
        for i in range(spec.num_layers)
    ]


def to_cuda(kv: KV) -> KV:
    return [(k.to(CUDA), v.to(CUDA)) for k, v in kv]


@asynccontextmanager
async def open_store(path: Path, stagings: Stagings, **kw: Any) -> AsyncIterator[KVStore]:
    async with kvstore.open(path, chunk_tokens=128, **kw) as store:
        store._stagings = stagings  # the backend under test
        yield store


# ---------------------------------------------------------------------- pool and copies


def test_the_pool_pins_and_reuses(stagings: Stagings) -> None:
    stagings.for_device(CUDA)
    pool = stagings.pool
    assert pool is not None
    block = pool.acquire(3 << 20)
    assert block.pinned
    assert is_pinned(block.tensor)
    pool.release(block)
    assert pool.acquire((3 << 20) - 1) is block
    s = pool.stats()
    assert s.allocations == 1
    assert s.reuses == 1
    assert s.allocated_bytes <= s.budget


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
async def test_copies_both_ways_are_bit_exact(stagings: Stagings, dtype: torch.dtype) -> None:
    kv = [(random_bits((300, 4, 64), dtype, 1), random_bits((300, 4, 64), dtype, 2))]
    async with stagings.for_device(CUDA).transfers() as transfers:
        host = await transfers.to_host(to_cuda(kv))
        assert host[0][0].device.type == "cpu"
        assert is_pinned(host[0][0])
        assert_same(host, kv)
        part = await transfers.to_host(to_cuda(kv), 100, 250)
        assert_same(part, [(k[100:250], v[100:250]) for k, v in kv])
        back = transfers.to_device([host[0][0], host[0][1]])
        assert back[0].device == CUDA
        assert_same([(back[0], back[1])], kv)
    assert stagings.pool is not None
    assert stagings.pool.stats().in_use_bytes == 0


async def test_device_to_host_waits_for_the_kernels_that_wrote_the_kv(stagings: Stagings) -> None:
    t = torch.zeros(16 << 20, device=CUDA)
    torch.cuda.synchronize()
    side = torch.cuda.Stream(CUDA)
    with torch.cuda.stream(side):
        torch.cuda._sleep(SPIN)
        t.fill_(7.0)  # queued behind the spin: an unordered copy would read zeros
        async with stagings.for_device(CUDA).transfers() as transfers:
            ((k, _),) = await transfers.to_host([(t, t)])
    assert bool((k == 7.0).all())


async def test_host_to_device_is_ordered_before_the_consumers_kernels(stagings: Stagings) -> None:
    want = torch.arange(64 << 20, dtype=torch.int32)  # 256 MiB: the copy takes milliseconds
    async with stagings.for_device(CUDA).transfers() as transfers:
        host = transfers.host_empty(tuple(want.shape), want.dtype)
        host.copy_(want)
        (out,) = transfers.to_device([host])
        total = out.to(torch.int64).sum()  # on torch's current stream, at once, without a synchronize
        assert int(total) == int(want.to(torch.int64).sum())


# ---------------------------------------------------------------------- the store


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
async def test_load_to_cuda_matches_the_cpu_load(tmp_path: Path, stagings: Stagings, dtype: torch.dtype) -> None:
    spec = spec_for(dtype)
    kv = kv_for(spec, 300)  # two full chunks and a tail
    tokens = list(range(300))
    async with open_store(tmp_path / "kv", stagings) as store:
        await store.save_prefix(spec, tokens, to_cuda(kv))
        cpu = await store.load_prefix(spec, tokens)
        gpu = await store.load_prefix(spec, tokens, device="cuda")
        assert gpu.num_tokens == 300
        assert gpu.kv[0][0].device.type == "cuda"
        assert_same(cpu.kv, kv)
        assert_same(gpu.kv, kv)
        seen = []
        async with store.load_prefix_layers(spec, tokens, device=CUDA) as layers:
            async for layer, k, v in layers:
                assert k.device == CUDA
                assert_same([(k, v)], [kv[layer]])
                seen.append(layer)
        assert seen == list(range(spec.num_layers))
        pool = stagings.pool
        assert pool is not None
        before = pool.stats()
        assert before.in_use_bytes == 0
        assert_same((await store.load_prefix(spec, tokens, device=CUDA)).kv, kv)
        after = pool.stats()
        assert after.allocations == before.allocations
        assert after.reuses > before.reuses
        stats = store.stats()
        assert (stats.pinned_bytes, stats.pinned_reuses) == (after.allocated_bytes, after.reuses)


async def test_save_reads_the_values_a_kernel_just_wrote(tmp_path: Path, stagings: Stagings) -> None:
    spec = spec_for(torch.bfloat16)
    want = kv_for(spec, 256)
    src = to_cuda(want)
    kv = [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in src]
    torch.cuda.synchronize()
    side = torch.cuda.Stream(CUDA)
    async with open_store(tmp_path / "kv", stagings) as store:
        with torch.cuda.stream(side):
            torch.cuda._sleep(SPIN)
            for (k, v), (sk, sv) in zip(kv, src, strict=True):
                k.copy_(sk)  # queued behind the spin
                v.copy_(sv)
            await store.save_prefix(spec, list(range(256)), kv)
        assert_same((await store.load_prefix(spec, list(range(256)))).kv, want)


async def test_write_back_copies_before_returning_so_the_caller_may_overwrite(
    tmp_path: Path, stagings: Stagings, counting_store: type
) -> None:
    spec = spec_for(torch.float16)
    want = kv_for(spec, 384)
    kv = to_cuda(want)
    tokens = list(range(384))
    backend = held(counting_store)(await open_object_store(str(tmp_path / "kv")), hold_puts=True)
    store = KVStore(backend, StoreOptions(chunk_tokens=128))
    store._stagings = stagings
    try:
        handle = await store.save_prefix(spec, tokens, kv, wait=False)
        for k, v in kv:  # the engine reuses its KV buffers at once
            k.fill_(0)
            v.fill_(0)
        pending = await store.load_prefix(spec, tokens, device=CUDA)  # read-your-writes, from the pinned copy
        assert_same(pending.kv, want)
        backend.gate.set()
        await handle
        await store.flush()
        assert stagings.pool is not None
        assert stagings.pool.stats().in_use_bytes == 0
    finally:
        backend.gate.set()
        await store.close()
    async with kvstore.open(tmp_path / "kv", chunk_tokens=128) as fresh:
        assert_same((await fresh.load_prefix(spec, tokens)).kv, want)


async def test_leaving_a_layer_stream_early_returns_its_buffers(
    tmp_path: Path, stagings: Stagings, counting_store: type
) -> None:
    spec = spec_for(torch.bfloat16)
    kv = kv_for(spec, 256)
    tokens = list(range(256))
    async with open_store(tmp_path / "kv", stagings) as store:
        await store.save_prefix(spec, tokens, kv)
    backend = held(counting_store)(await open_object_store(str(tmp_path / "kv")), read_from=1)
    store = KVStore(backend, StoreOptions(chunk_tokens=128))
    store._stagings = stagings
    try:
        async with store.load_prefix_layers(spec, tokens, device=CUDA) as layers:
            layer, k, _ = await layers.__anext__()
            assert layer == 0
            assert_same([(k, k)], [(kv[0][0], kv[0][0])])
            assert stagings.pool is not None
            assert stagings.pool.stats().in_use_bytes > 0
        assert stagings.pool.stats().in_use_bytes == 0  # reads were cancelled in flight: bytes back, memory not reused

        task = asyncio.create_task(store.load_prefix(spec, tokens, device=CUDA))
        await until(lambda: backend.held >= 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert stagings.pool.stats().in_use_bytes == 0

        handle = store.prefetch(spec, tokens, device=CUDA)
        await until(lambda: backend.held >= 4)
        handle.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handle
        pool = stagings.pool
        await until(lambda: pool.stats().in_use_bytes == 0)
    finally:
        backend.gate.set()
        await store.close()


async def test_a_pool_too_small_overflows_to_pageable_memory_and_stays_exact(tmp_path: Path) -> None:
    stagings = Stagings(1 << 20)  # smaller than one load
    spec = spec_for(torch.bfloat16, layers=8)
    kv = kv_for(spec, 512)
    tokens = list(range(512))
    async with open_store(tmp_path / "kv", stagings) as store:
        await store.save_prefix(spec, tokens, to_cuda(kv))
        assert_same((await store.load_prefix(spec, tokens, device=CUDA)).kv, kv)
    assert stagings.pool is not None
    s = stagings.pool.stats()
    assert s.overflows > 0
    assert s.allocated_bytes <= s.budget
    assert s.in_use_bytes == 0


# ---------------------------------------------------------------------- gated backends

_LAYER = re.compile(r"/c\.(\d+)\.0\.0\.0\.0$")


def held(base: type) -> Any:
    """A subclass of the conftest counting store whose layer objects wait for ``gate``.

    ``hold_puts``: every layer write waits (a background save stays pending);
    ``read_from``: reads of that layer and later wait, and ``held`` counts them.
    """

    class Held(base):  # type: ignore[misc]
        def __init__(self, inner: ObjectStore, *, hold_puts: bool = False, read_from: int | None = None) -> None:
            super().__init__(inner)
            self.gate = asyncio.Event()
            self.hold_puts = hold_puts
            self.read_from = read_from
            self.held = 0

        async def _hold_layer(self, key: str, *, write: bool) -> None:
            m = _LAYER.search(key)
            if m is None or not (
                self.hold_puts if write else self.read_from is not None and int(m[1]) >= self.read_from
            ):
                return
            self.held += 1
            try:
                await self.gate.wait()
            finally:
                self.held -= 1

        async def get(self, key: str) -> bytes:
            await self._hold_layer(key, write=False)
            return await super().get(key)  # type: ignore[no-any-return]

        async def get_into(self, key: str, buffers: Any, *, then: Any = None) -> int:
            await self._hold_layer(key, write=False)
            return await super().get_into(key, buffers, then=then)  # type: ignore[no-any-return]

        async def put(self, key: str, data: bytes, *, create_only: bool = False) -> bool:
            await self._hold_layer(key, write=True)
            return await super().put(key, data, create_only=create_only)  # type: ignore[no-any-return]

        async def put_parts(self, key: str, parts: Any) -> None:
            await self._hold_layer(key, write=True)
            await super().put_parts(key, parts)

    return Held
