"""Which staging a device gets, the cupy fallback's warning, and the store option (runs without CUDA)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

import kvstore
from kvstore.gpu import PlainStaging, Stagings, staging_for
from kvstore.gpu.cupy_engine import load_cupy
from kvstore.gpu.transfers import PlainTransfers


def test_the_cpu_gets_plain_torch_and_no_pool() -> None:
    stagings = Stagings(load_cupy=lambda: pytest.fail("cupy looked for on the CPU"))
    staging = stagings.for_device("cpu")
    assert isinstance(staging, PlainStaging)
    assert staging.device == torch.device("cpu")
    assert stagings.for_device(torch.device("cpu")) is staging
    assert stagings.for_kv([(torch.zeros(1), torch.zeros(1))]) is staging
    assert stagings.pool is None
    assert isinstance(staging_for("cpu"), PlainStaging)


async def test_plain_transfers_copy_no_more_than_before() -> None:
    transfers = staging_for("cpu").transfers()
    assert isinstance(transfers, PlainTransfers)
    t = transfers.host_empty((4, 2, 3), torch.bfloat16)
    assert t.shape == (4, 2, 3)
    assert t.dtype == torch.bfloat16
    assert not t.is_pinned()
    assert transfers.to_device([t])[0] is t  # no copy on the CPU
    copied = transfers.to_device([t], copy=True)[0]
    assert copied.data_ptr() != t.data_ptr()
    src = torch.arange(24.0).view(4, 2, 3)
    ((k, _),) = await transfers.to_host([(src, src)], 1, 3)
    assert k.data_ptr() == src[1].data_ptr()  # a view where the data already is
    ((k, _),) = await transfers.to_host([(src, src)], 1, 3, copy=True)
    assert k.data_ptr() != src[1].data_ptr()
    assert torch.equal(k, src[1:3])
    await transfers.aclose()


def test_without_cupy_cuda_falls_back_to_torch_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    stagings = Stagings(load_cupy=lambda: None)
    with caplog.at_level(logging.WARNING, logger="kvstore"):
        assert stagings.cuda_backend() == "torch"
        assert stagings.cuda_backend() == "torch"
    warnings = [r for r in caplog.records if "kvstore[gpu]" in r.getMessage()]
    assert len(warnings) == 1


def test_with_cupy_cuda_uses_it_silently(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kvstore"):
        assert Stagings(load_cupy=lambda: object()).cuda_backend() == "cupy"
    assert caplog.records == []


def test_load_cupy_is_none_when_it_is_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    assert load_cupy() is None


async def test_the_pinned_pool_is_a_store_option(tmp_path: Path) -> None:
    async with kvstore.open(tmp_path / "kv", pinned_pool_bytes=1 << 20) as store:
        assert store.options.pinned_pool_bytes == 1 << 20
    async with kvstore.open(tmp_path / "kv") as store:
        assert store.options.pinned_pool_bytes == 1 << 30
    with pytest.raises(kvstore.InvalidInputError, match="pinned_pool_bytes"):
        kvstore.open(tmp_path / "kv", pinned_pool_bytes=-1)
