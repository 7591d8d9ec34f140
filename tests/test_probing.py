"""Probing a chain's first missing chunk: few HEADs, the right answer wherever presence is monotone."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from kvstore.probing import PROBES, find_first_missing, probe_points
from kvstore.storage import ObjectMeta


class FakeHeads:
    """HEADs over a set of present indices; counts rounds and keys."""

    def __init__(self, present: set[int]) -> None:
        self.present = present
        self.rounds: list[list[int]] = []

    async def __call__(self, paths: Sequence[str]) -> list[ObjectMeta | None]:
        idx = [int(p) for p in paths]
        self.rounds.append(idx)
        return [ObjectMeta(p, 10 + int(p), None) if int(p) in self.present else None for p in paths]


def test_probe_points_span_the_chain() -> None:
    assert probe_points(64) == [0, 7, 15, 23, 31, 39, 47, 55, 63]
    assert probe_points(17) == [0, 2, 5, 8, 11, 14, 16]
    for n in range(1, 300):
        pts = probe_points(n)
        assert pts[0] == 0
        assert pts[-1] == n - 1
        assert pts == sorted(set(pts))
        assert max(b - a for a, b in zip([-1, *pts], pts, strict=False)) <= -(-n // PROBES)


@pytest.mark.parametrize("n", [1, 5, 16, 17, 64, 100, 257])
async def test_monotone_chains_are_found_exactly(n: int) -> None:
    paths = [str(i) for i in range(n)]
    for stored in range(n + 1):
        heads = FakeHeads(set(range(stored)))
        first, seen = await find_first_missing(heads, paths)
        assert first == stored
        assert all((seen[i] is not None) == (i < stored) for i in seen)
        assert all(seen[i] is not None and seen[i].size == 10 + i for i in seen if i < stored)  # type: ignore[union-attr]
        total = sum(len(r) for r in heads.rounds)
        if n <= 2 * PROBES:
            assert heads.rounds == [list(range(n))]
        else:
            assert len(heads.rounds) <= 2
            assert total <= len(probe_points(n)) + -(-n // PROBES) - 1
            if stored in (0, n):  # absent, or stored whole: one round
                assert len(heads.rounds) == 1


async def test_a_64_chunk_chain_costs_at_most_16_heads() -> None:
    paths = [str(i) for i in range(64)]
    worst = 0
    for stored in range(65):
        heads = FakeHeads(set(range(stored)))
        await find_first_missing(heads, paths)
        worst = max(worst, sum(len(r) for r in heads.rounds))
    assert worst <= 16


async def test_a_hole_between_probes_is_not_seen_but_one_at_a_probe_is() -> None:
    paths = [str(i) for i in range(64)]
    first, _ = await find_first_missing(FakeHeads(set(range(64)) - {3}), paths)
    assert first == 64  # documented: presence is assumed monotone between present probes
    first, _ = await find_first_missing(FakeHeads(set(range(64)) - {15}), paths)
    assert first == 15
    first, seen = await find_first_missing(FakeHeads(set(range(40)) | {50, 63}), paths)
    assert first == 40
    assert seen[63] is not None  # present after the gap: the save rewrites it
