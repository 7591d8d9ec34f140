"""``kvstore`` console script: inspect and maintain stores from a shell.

Commands: ``info``, ``ls``, ``stats``, ``verify``, ``retire``, ``gc``. Errors
print as one line (``--debug`` shows the traceback). Exit codes: 0 success,
1 error, 2 usage error, 3 ``verify`` found damaged chunks, 130 interrupted.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import click
from rich.table import Table

import kvstore
from kvstore.cli.common import fmt_time, make_console, parse_options, run_async, store_arguments
from kvstore.cli.gc_cmd import gc_command, retire_command
from kvstore.cli.inspect_cmd import ls_command, stats_command, verify_command

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.version_option(kvstore.__version__, prog_name="kvstore")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Inspect and manage kvstore KV-cache stores (local paths, file://, memory://, s3://).

    S3 settings come from --storage-option and, as aws tools do, from the
    environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_REGION / AWS_DEFAULT_REGION, AWS_PROFILE).
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


@cli.command()
@store_arguments
@click.pass_context
def info(ctx: click.Context, url: str, storage_option: tuple[str, ...], as_json: bool) -> None:
    """Show a store's settings and the model versions saved in it."""
    options = parse_options(storage_option, url)

    async def work() -> tuple[int, list[kvstore.ModelInfo]]:
        async with kvstore.open(url, storage_options=options, create=False) as store:
            return store.chunk_tokens, await store.models()

    chunk_tokens, models = run_async(ctx, work)
    rows: list[dict[str, Any]] = [
        {
            "name": r.spec.name,
            "version": r.spec.version,
            "model_id": r.model_id.hex(),
            "status": r.status,
            "layers": r.spec.num_layers,
            "kv_heads": r.spec.num_kv_heads,
            "head_dim": r.spec.head_dim,
            "dtype": r.spec.dtype_name,
            "first_saved": fmt_time(r.created),
        }
        for r in models
    ]
    if as_json:
        payload = {"url": url, "format_version": kvstore.FORMAT_VERSION, "chunk_tokens": chunk_tokens, "models": rows}
        click.echo(json.dumps(payload, indent=2))
        return
    console = make_console()
    console.print(f"[bold]{url}[/]  format v{kvstore.FORMAT_VERSION}, {chunk_tokens} tokens per chunk")
    table = Table("name", "version", "layers", "kv heads", "head dim", "dtype", "first saved (UTC)")
    for row in rows:
        table.add_row(
            row["name"], row["version"], str(row["layers"]), str(row["kv_heads"]),
            str(row["head_dim"]), row["dtype"], row["first_saved"],
        )  # fmt: skip
    console.print(table if rows else "no models saved yet")


for _command in (ls_command, stats_command, verify_command, retire_command, gc_command):
    cli.add_command(_command)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``kvstore`` console script."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="kvstore", standalone_mode=True)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
