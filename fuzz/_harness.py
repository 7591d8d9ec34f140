"""What the atheris harnesses share: hostile msgpack values and the libFuzzer entry point.

A harness calls ``fuzz(test_one)``; ``test_one`` may raise only kvstore's own
errors (``KVStoreError``): anything else, a crash or a hang is a finding.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import atheris

_MAX_DEPTH = 4


def hostile_value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> Any:
    """A msgpack-encodable value of any type, biased towards limits, wrong types and nesting."""
    kind = fdp.ConsumeIntInRange(0, 9 if depth < _MAX_DEPTH else 6)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.PickValueInList([0, 1, -1, 2**24, 2**24 + 1, 2**31, 2**40, 2**63 - 1, -(2**63), 2**64 - 1])
    if kind == 3:
        return fdp.ConsumeInt(8)
    if kind == 4:
        return fdp.ConsumeRegularFloat() if fdp.ConsumeBool() else fdp.ConsumeFloat()
    if kind == 5:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 80))
    if kind == 6:
        return fdp.ConsumeBytes(fdp.PickValueInList([0, 1, 15, 16, 17, 31, 32, 33, 64]))
    size = fdp.ConsumeIntInRange(0, 8)
    if kind in (7, 8):
        return [hostile_value(fdp, depth + 1) for _ in range(size)]
    return {fdp.ConsumeUnicodeNoSurrogates(8): hostile_value(fdp, depth + 1) for _ in range(size)}


def mutate_record(fdp: atheris.FuzzedDataProvider, fields: dict[str, Any]) -> dict[str, Any]:
    """A valid record's fields with some replaced, dropped or added: gets past the first checks."""
    out = dict(fields)
    names = sorted(out)
    for _ in range(fdp.ConsumeIntInRange(1, 3)):
        action = fdp.ConsumeIntInRange(0, 2)
        name = fdp.PickValueInList(names)
        if action == 0:
            out[name] = hostile_value(fdp)
        elif action == 1:
            out.pop(name, None)
        else:
            out[fdp.ConsumeUnicodeNoSurrogates(8)] = hostile_value(fdp)
    return out


def fuzz(test_one: Callable[[bytes], None]) -> None:
    """Run ``test_one`` under libFuzzer with this process's command line (``-atheris_runs=N``, ...)."""
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()
