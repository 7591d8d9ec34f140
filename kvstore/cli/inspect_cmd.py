"""``kvstore ls``, ``kvstore stats`` and ``kvstore verify``: what a store holds and whether it is intact."""

from __future__ import annotations

import json
from typing import Any

import click
from rich.table import Table

from kvstore.cli.common import (
    EXIT_DAMAGED,
    RichProgress,
    fmt_bytes,
    fmt_time,
    make_console,
    parse_model,
    parse_options,
    run_async,
    store_arguments,
)

__all__ = ["ls_command", "stats_command", "verify_command"]


def _scan(ctx: click.Context, url: str, storage_option: tuple[str, ...], sample: int, as_json: bool) -> Any:
    from kvstore.gc import UsageReport, scan_usage
    from kvstore.storage import open_object_store

    options = parse_options(storage_option, url)
    progress = RichProgress(False if as_json else None)

    async def work() -> UsageReport:
        backend = await open_object_store(url, options)
        try:
            with progress.shown():
                return await scan_usage(backend, sample=sample, progress=progress)
        finally:
            await backend.close()

    return run_async(ctx, work)


@click.command("ls")
@store_arguments
@click.pass_context
def ls_command(ctx: click.Context, url: str, storage_option: tuple[str, ...], as_json: bool) -> None:
    """List model versions: status, committed chunks, bytes, last write, last use; and namespaces under URL."""
    report = _scan(ctx, url, storage_option, 0, as_json)
    models = sorted(report.models.values(), key=lambda m: m.label)
    spaces = [n for _, n in sorted(report.namespaces.items())]
    if as_json:
        keys = (
            "label", "model_id", "status", "chunks", "objects", "bytes", "last_write", "last_use", "retired_at",
            "retired_by",
        )  # fmt: skip
        rows = [{k: getattr(m, k) for k in keys} for m in models]
        click.echo(json.dumps({"url": url, "models": rows, "namespaces": [n.as_dict() for n in spaces]}, indent=2))
        return
    table = Table(
        "model version", "status", "chunks", "objects", "bytes", "last write (UTC)", "last use (UTC)",
        "retired (UTC) by",
    )  # fmt: skip
    for m in models:
        retired = f"{fmt_time(m.retired_at)} {m.retired_by}" if m.retired_at is not None else ""
        table.add_row(
            m.label, m.status, f"{m.chunks:,}", f"{m.objects:,}", fmt_bytes(m.bytes), fmt_time(m.last_write),
            fmt_time(m.last_use), retired,
        )  # fmt: skip
    console = make_console()
    console.print(table if models else "no models saved yet")
    if spaces:
        console.print(_namespace_table(spaces))


def _namespace_table(spaces: list[Any]) -> Table:
    table = Table("namespace", "chunks", "objects", "bytes", "last use (UTC)", title="namespaces")
    for n in spaces:
        table.add_row(n.name, f"{n.chunks:,}", f"{n.objects:,}", fmt_bytes(n.bytes), fmt_time(n.last_use))
    return table


@click.command("stats")
@store_arguments
@click.option("--sample", default=256, show_default=True, type=click.IntRange(min=0), help="Commit records per model.")
@click.pass_context
def stats_command(ctx: click.Context, url: str, storage_option: tuple[str, ...], as_json: bool, sample: int) -> None:
    """Totals, chunk size distribution, compression ratio and objects per chunk."""
    report = _scan(ctx, url, storage_option, sample, as_json)
    data = report.as_dict()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    console = make_console()
    ratio = data["compression_ratio"]
    per_chunk = data["objects_per_chunk"]
    console.print(
        f"[bold]{url}[/]: {data['objects']:,} objects, {fmt_bytes(data['bytes'])}, "
        f"{data['chunks']:,} committed chunks of up to {data['chunk_tokens']} tokens"
    )
    console.print(f"objects per chunk: {per_chunk:.2f}" if per_chunk else "objects per chunk: -")
    console.print(f"compression ratio (sampled): {ratio:.3f}" if ratio else "compression ratio: -")
    hist = Table("chunk size", "chunks", title="chunk size distribution")
    for bucket, n in data["chunk_size_histogram"].items():
        hist.add_row(f"≤ {fmt_bytes(int(bucket[1:]))}", f"{n:,}")
    console.print(hist)
    table = Table("model version", "status", "chunks", "bytes", "last use (UTC)", "avg tokens/chunk", "compression")
    for m in sorted(report.models.values(), key=lambda m: m.label):
        avg = f"{m.sampled_tokens / m.sampled_chunks:.1f}" if m.sampled_chunks else "-"
        comp = f"{m.compression_ratio:.3f}" if m.compression_ratio else "-"
        table.add_row(m.label, m.status, f"{m.chunks:,}", fmt_bytes(m.bytes), fmt_time(m.last_use), avg, comp)
    console.print(table)
    if report.namespaces:
        console.print(_namespace_table([n for _, n in sorted(report.namespaces.items())]))


@click.command("verify")
@store_arguments
@click.option("--model", "models", multiple=True, metavar="NAME@VERSION", help="Only this model version (repeatable).")
@click.option("--repair", is_flag=True, help="Delete damaged chunks (refetched as misses); rewrite bad zarr.json.")
@click.option("--concurrency", default=16, show_default=True, type=click.IntRange(min=1), help="Chunks in flight.")
@click.pass_context
def verify_command(
    ctx: click.Context,
    url: str,
    storage_option: tuple[str, ...],
    as_json: bool,
    models: tuple[str, ...],
    repair: bool,
    concurrency: int,
) -> None:
    """Re-read every chunk's data object; check its index, header, sizes and checksums.

    Each array's zarr.json (one per model and chunk length) is checked once: a
    missing or unreadable one, or one that decodes otherwise (shape, data type,
    codec chain), is reported apart (stock zarr cannot read that array's chunks;
    kvstore can) and rewritten with --repair. Exit code 3 when damaged chunks
    were found and not repaired.
    """
    from kvstore.gc import VerifyReport, verify_store
    from kvstore.storage import open_object_store

    wanted = [parse_model(m) for m in models] or None
    options = parse_options(storage_option, url)
    progress = RichProgress(False if as_json else None)

    async def work() -> VerifyReport:
        backend = await open_object_store(url, options)
        try:
            with progress.shown():
                return await verify_store(
                    backend, models=wanted, repair=repair, concurrency=concurrency, progress=progress
                )
        finally:
            await backend.close()

    report = run_async(ctx, work)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        console = make_console()
        if report.damaged:
            table = Table("model version", "chunk", "problem", title="damaged chunks")
            for d in report.damaged:
                table.add_row(d.model, d.key[:16] + "…", d.problem)
            console.print(table)
        action = f", {report.repaired:,} deleted (--repair)" if repair else ""
        console.print(
            f"{report.chunks_checked:,} chunks checked ({fmt_bytes(report.bytes_read)} read), "
            f"{len(report.damaged):,} damaged{action}; took {report.elapsed:.2f}s"
        )
        if report.metadata_problems:
            fixed = f", {report.metadata_rewritten:,} rewritten (--repair)" if repair else ""
            console.print(f"{report.metadata_problems:,} arrays with a missing or wrong zarr.json{fixed}")
    if report.damaged and not repair:
        ctx.exit(EXIT_DAMAGED)
