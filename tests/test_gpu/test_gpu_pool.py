"""The host buffer pool's bookkeeping, on plain CPU memory through an injected allocator (runs without CUDA)."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from kvstore.gpu.pool import MIN_SIZE_CLASS, HostBlock, HostPool, size_class

MiB = 1 << 20


class CountingAllocator:
    """Plain CPU memory, counting what it allocates and what is still alive (freed when unreferenced)."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.fail = False

    def __call__(self, nbytes: int) -> torch.Tensor:
        if self.fail:
            raise MemoryError("injected")
        self.calls.append(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8)


def make_pool(budget: int) -> tuple[HostPool, CountingAllocator]:
    alloc = CountingAllocator()
    return HostPool(budget, alloc, pinned=False), alloc


@pytest.mark.parametrize("nbytes", [1, 4096, MIN_SIZE_CLASS, MIN_SIZE_CLASS + 1, 3 * MiB, 5 * MiB + 7, 1 << 30])
def test_size_class_covers_the_request_and_wastes_at_most_a_quarter(nbytes: int) -> None:
    cls = size_class(nbytes)
    assert cls >= nbytes
    assert cls == MIN_SIZE_CLASS or cls <= nbytes * 1.25
    assert size_class(cls) == cls  # a class serves itself


def test_a_released_buffer_comes_back_without_a_new_allocation() -> None:
    pool, alloc = make_pool(64 * MiB)
    first = pool.acquire(3 * MiB)
    pool.release(first)
    again = pool.acquire(3 * MiB - 100)  # same class
    assert again is first
    assert again.tensor.data_ptr() == first.tensor.data_ptr()
    assert len(alloc.calls) == 1
    s = pool.stats()
    assert (s.allocations, s.reuses, s.in_use_bytes) == (1, 1, first.size)


def test_view_is_zero_copy_over_the_buffer() -> None:
    pool, _ = make_pool(8 * MiB)
    block = pool.acquire(2 * 3 * 4 * 2)
    t = block.view((2, 3, 4), torch.bfloat16)
    assert t.shape == (2, 3, 4)
    assert t.dtype == torch.bfloat16
    assert t.is_contiguous()
    assert t.data_ptr() == block.tensor.data_ptr()
    t.fill_(1.5)
    assert block.tensor[:2].tolist() == list(torch.tensor([1.5], dtype=torch.bfloat16).view(torch.uint8).tolist())


def test_past_the_budget_requests_overflow_to_unpooled_memory() -> None:
    pool, alloc = make_pool(4 * MiB)
    held = pool.acquire(3 * MiB)
    over = pool.acquire(2 * MiB)  # 3 + 2 > 4: does not fit
    assert not over.pooled
    assert not over.pinned
    assert over.tensor.numel() == 2 * MiB
    assert pool.stats().overflows == 1
    assert pool.stats().allocated_bytes == held.size <= pool.budget
    pool.release(over)  # a no-op, not an error
    assert len(alloc.calls) == 1


def test_cached_buffers_are_evicted_to_make_room() -> None:
    pool, alloc = make_pool(4 * MiB)
    small = pool.acquire(2 * MiB)
    pool.release(small)
    big = pool.acquire(3 * MiB)  # needs the cached 2 MiB freed first
    assert big.pooled
    s = pool.stats()
    assert s.evictions == 1
    assert s.cached_bytes == 0
    assert s.allocated_bytes == big.size
    assert len(alloc.calls) == 2


def test_the_cache_is_kept_when_the_buffers_in_use_leave_no_room() -> None:
    pool, _ = make_pool(4 * MiB)
    held = pool.acquire(3 * MiB)
    spare = pool.acquire(MiB // 2)
    pool.release(spare)
    over = pool.acquire(2 * MiB)
    assert not over.pooled
    assert pool.stats().evictions == 0
    assert pool.stats().cached_bytes == spare.size
    pool.release(held)


def test_a_budget_of_zero_never_pins() -> None:
    pool, alloc = make_pool(0)
    assert not pool.acquire(1).pooled
    assert alloc.calls == []


def test_releasing_twice_or_a_foreign_buffer_is_an_error() -> None:
    pool, _ = make_pool(8 * MiB)
    other, _ = make_pool(8 * MiB)
    block = pool.acquire(MiB)
    pool.release(block)
    with pytest.raises(ValueError, match="not lent"):
        pool.release(block)
    with pytest.raises(ValueError, match="not lent"):
        other.release(pool.acquire(MiB))


def test_discard_returns_the_bytes_but_never_the_memory() -> None:
    pool, alloc = make_pool(8 * MiB)
    block = pool.acquire(MiB)
    pool.discard(block)
    s = pool.stats()
    assert (s.in_use_bytes, s.allocated_bytes, s.cached_bytes) == (0, 0, 0)
    assert pool.acquire(MiB) is not block
    assert len(alloc.calls) == 2


def test_a_failed_allocation_gives_its_reservation_back() -> None:
    pool, alloc = make_pool(8 * MiB)
    alloc.fail = True
    with pytest.raises(MemoryError):
        pool.acquire(MiB)
    assert pool.stats().allocated_bytes == 0


def test_clear_frees_the_cache_only() -> None:
    pool, _ = make_pool(8 * MiB)
    held, spare = pool.acquire(MiB), pool.acquire(2 * MiB)
    pool.release(spare)
    pool.clear()
    s = pool.stats()
    assert s.cached_bytes == 0
    assert s.allocated_bytes == s.in_use_bytes == held.size


@pytest.mark.parametrize("seed", range(5))
def test_random_use_never_exceeds_the_budget(seed: int) -> None:
    rng = random.Random(seed)
    pool, _ = make_pool(16 * MiB)
    held: list[HostBlock] = []
    for _ in range(2000):
        if held and rng.random() < 0.5:
            pool.release(held.pop(rng.randrange(len(held))))
        else:
            held.append(pool.acquire(rng.choice([MiB, 3 * MiB, 5 * MiB + 1, 100])))
        s = pool.stats()
        assert s.allocated_bytes <= s.budget
        assert s.allocated_bytes == s.in_use_bytes + s.cached_bytes
        assert s.in_use_bytes == sum(b.size for b in held if b.pooled)


def test_threads_acquiring_and_releasing_keep_the_books_straight() -> None:
    pool, _ = make_pool(32 * MiB)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(500):
                block = pool.acquire(rng.choice([MiB, 2 * MiB, 3 * MiB]))
                pool.release(block)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    s = pool.stats()
    assert s.in_use_bytes == 0
    assert s.allocated_bytes == s.cached_bytes <= s.budget
