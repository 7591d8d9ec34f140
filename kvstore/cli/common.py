"""What every command shares: store options, running async work with one-line errors, progress, formatting."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from kvstore.errors import KVStoreError

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

__all__ = [
    "EXIT_DAMAGED",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "RichProgress",
    "fmt_bytes",
    "make_console",
    "fmt_time",
    "parse_duration",
    "parse_model",
    "parse_options",
    "run_async",
    "store_arguments",
]

EXIT_ERROR = 1
EXIT_DAMAGED = 3
EXIT_INTERRUPTED = 130

_PHASES = {
    "list": "listing",
    "read": "marking (chunk headers)",
    "sweep": "sweeping",
    "evict": "evicting (least recently used)",
    "verify": "verifying",
}


def parse_options(pairs: Sequence[str], url: str | None = None) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (JSON values are converted; dotted keys nest), plus S3 settings from the environment.

    For ``s3://`` URLs the endpoint and region come from ``AWS_ENDPOINT_URL_S3`` /
    ``AWS_ENDPOINT_URL`` and ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` unless given;
    credentials follow botocore's usual chain (environment, profiles, instance roles).
    """
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--storage-option")
        try:
            parsed: Any = json.loads(value)
        except ValueError:
            parsed = value
        *parents, leaf = key.split(".")
        target = options
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise click.BadParameter(f"{key!r} conflicts with another option", param_hint="--storage-option")
        target[leaf] = parsed
    if url is not None and url.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "endpoint_url" not in options:
            options["endpoint_url"] = endpoint
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        client_kwargs = options.setdefault("client_kwargs", {})
        if region and isinstance(client_kwargs, dict):
            client_kwargs.setdefault("region_name", region)
        if not client_kwargs:
            options.pop("client_kwargs")
    return options


def store_arguments(func: F) -> F:
    """The URL argument and the options every store command takes."""
    func = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of tables.")(func)
    func = click.option(
        "--storage-option",
        "-o",
        multiple=True,
        metavar="KEY=VALUE",
        help="fsspec storage option (repeatable; dotted keys nest: client_kwargs.region_name=eu-west-1).",
    )(func)
    return click.argument("url")(func)


def run_async(ctx: click.Context, work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``work`` in a fresh loop; errors become one line on stderr (``--debug`` shows the traceback)."""
    try:
        return asyncio.run(work())
    except KeyboardInterrupt:
        click.echo("kvstore: interrupted; the store is consistent and running the command again finishes it", err=True)
        ctx.exit(EXIT_INTERRUPTED)
    except click.exceptions.Exit:
        raise
    except click.ClickException:
        raise
    except Exception as exc:
        if ctx.find_root().obj.get("debug"):
            raise
        what = str(exc) if isinstance(exc, KVStoreError) else f"{type(exc).__name__}: {exc}"
        click.echo(f"kvstore: error: {' '.join(what.split())}", err=True)
        ctx.exit(EXIT_ERROR)
    raise AssertionError("unreachable")  # pragma: no cover


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(value: str | float) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``1h``, ``2d``, ``1w``."""
    if isinstance(value, (int, float)):
        return float(value)
    m = _DURATION.match(value)
    if not m:
        raise click.BadParameter(f"expected a duration like 30s, 15m, 1h or 2d, got {value!r}")
    return float(m.group(1)) * _UNIT[m.group(2) or "s"]


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?i?b)?\s*$", re.IGNORECASE)
_SIZE_UNIT = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "pib": 1 << 50,
}  # fmt: skip


def parse_size(value: str) -> int:
    """Bytes from ``500GiB``, ``1.5TB``, ``800MB``, ``4096`` (KB/MB/GB/TB decimal, KiB/MiB/GiB/TiB binary)."""
    m = _SIZE.match(value)
    unit = (m.group(2) or "b").lower() if m else ""
    if not m or unit not in _SIZE_UNIT:
        raise click.BadParameter(f"expected a size like 500GiB, 1.5TB or 800MB, got {value!r}")
    return int(float(m.group(1)) * _SIZE_UNIT[unit])


def parse_model(value: str) -> tuple[str, str]:
    """``NAME@VERSION`` (split at the last ``@``)."""
    name, sep, version = value.rpartition("@")
    if not sep or not name or not version:
        raise click.BadParameter(f"expected NAME@VERSION, got {value!r}")
    return name, version


def make_console() -> Console:
    """stdout console; when piped, wide enough that tables are not squeezed into 80 columns."""
    return Console(width=None if sys.stdout.isatty() else 160)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def fmt_time(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) if ts is not None else "-"


class RichProgress:
    """GC/verify progress as rich bars on stderr; a no-op when stderr is not a terminal."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=False,
            disable=not self.enabled,
        )
        self._tasks: dict[str, TaskID] = {}

    @contextmanager
    def shown(self) -> Iterator[RichProgress]:
        with self._progress:
            yield self

    def start(self, phase: str, total: int | None) -> None:
        self._tasks[phase] = self._progress.add_task(_PHASES.get(phase, phase), total=total)

    def advance(self, phase: str, n: int) -> None:
        if phase in self._tasks:
            self._progress.advance(self._tasks[phase], n)

    def finish(self, phase: str) -> None:
        task = self._tasks.get(phase)
        if task is not None:
            done = self._progress.tasks[[t.id for t in self._progress.tasks].index(task)].completed
            self._progress.update(task, total=done, completed=done)
