"""``kvstore`` console script: inspect stores from a shell.

Errors print as one line (``--debug`` shows the traceback); exit code 0 on
success, 1 on a kvstore error, 2 on a usage error.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

import kvstore
from kvstore.errors import KVStoreError

T = TypeVar("T")

__all__ = ["cli", "main"]


def _parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values that parse as JSON (numbers, true/false) are converted."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--storage-option")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def _run(ctx: click.Context, work: Callable[[], Awaitable[T]]) -> T:
    try:
        return asyncio.run(work())  # type: ignore[arg-type]
    except KVStoreError as exc:
        if ctx.obj.get("debug"):
            raise
        click.echo(f"kvstore: error: {exc}", err=True)
        ctx.exit(1)
        raise AssertionError("unreachable") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.version_option(kvstore.__version__, prog_name="kvstore")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Inspect and manage kvstore KV-cache stores (local paths, file://, memory://, s3://)."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


@cli.command()
@click.argument("url")
@click.option("--storage-option", "-o", multiple=True, metavar="KEY=VALUE", help="fsspec storage option.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def info(ctx: click.Context, url: str, storage_option: tuple[str, ...], as_json: bool) -> None:
    """Show a store's settings and the model versions saved in it."""
    options = _parse_options(storage_option)

    async def work() -> tuple[int, list[kvstore.formats.records.ModelRecord]]:
        async with kvstore.open(url, storage_options=options, create=False) as store:
            return store.chunk_tokens, await store.models()

    chunk_tokens, models = _run(ctx, work)
    rows: list[dict[str, Any]] = [
        {
            "name": r.spec.name,
            "version": r.spec.version,
            "model_id": r.model_id.hex(),
            "layers": r.spec.num_layers,
            "kv_heads": r.spec.num_kv_heads,
            "head_dim": r.spec.head_dim,
            "dtype": r.spec.dtype_name,
            "first_saved": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.created)),
        }
        for r in models
    ]
    if as_json:
        payload = {"url": url, "format_version": kvstore.FORMAT_VERSION, "chunk_tokens": chunk_tokens, "models": rows}
        click.echo(json.dumps(payload, indent=2))
        return
    console = Console()
    console.print(f"[bold]{url}[/]  format v{kvstore.FORMAT_VERSION}, {chunk_tokens} tokens per chunk")
    table = Table("name", "version", "layers", "kv heads", "head dim", "dtype", "first saved (UTC)")
    for row in rows:
        table.add_row(
            row["name"], row["version"], str(row["layers"]), str(row["kv_heads"]),
            str(row["head_dim"]), row["dtype"], row["first_saved"],
        )  # fmt: skip
    console.print(table if rows else "no models saved yet")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``kvstore`` console script."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="kvstore", standalone_mode=True)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
