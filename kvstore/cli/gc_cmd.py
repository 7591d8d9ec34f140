"""``kvstore gc`` and ``kvstore retire``: model-version invalidation and garbage collection."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from collections.abc import Iterator
from typing import Any

import click
from rich.console import Console
from rich.table import Table

import kvstore
from kvstore.cli.common import (
    EXIT_ERROR,
    RichProgress,
    fmt_bytes,
    fmt_time,
    make_console,
    parse_duration,
    parse_model,
    parse_options,
    parse_size,
    run_async,
    store_arguments,
)

__all__ = ["gc_command", "retire_command"]

DEFAULT_CONFIRM_THRESHOLD = 1000


def is_terminal() -> bool:
    """Whether a person can answer a prompt (stdin and stdout are terminals)."""
    return sys.stdin.isatty() and sys.stdout.isatty()


def _summary_table(report: Any) -> Table:
    title = "GC dry run: nothing deleted" if report.dry_run else "GC summary"
    freed = "to free" if report.dry_run else "freed"
    evicting = report.max_bytes is not None or report.max_idle is not None
    extra = ["evicted chunks", "evicted bytes", "last use (UTC)"] if evicting else []
    table = Table(
        "model version", "status", "kept objects", "kept bytes", f"{freed} objects", f"{freed} bytes",
        "within grace", *extra, title=title,
    )  # fmt: skip
    for m in sorted(report.by_model.values(), key=lambda m: m.label):
        more = [f"{m.evicted_chunks:,}", fmt_bytes(m.evicted_bytes), fmt_time(m.last_use)] if evicting else []
        table.add_row(
            m.label, m.status, f"{m.kept_objects:,}", fmt_bytes(m.kept_bytes), f"{m.freed_objects:,}",
            fmt_bytes(m.freed_bytes), f"{m.young_objects:,}", *more,
        )  # fmt: skip
    young = sum(m.young_objects for m in report.by_model.values())
    table.add_section()
    total_more = [f"{report.evicted_chunks:,}", fmt_bytes(report.evicted_bytes), ""] if evicting else []
    table.add_row(
        "total", "", f"{report.kept_objects - young:,}", fmt_bytes(report.kept_bytes), f"{report.freed_objects:,}",
        fmt_bytes(report.freed_bytes), f"{young:,}", *total_more, style="bold",
    )  # fmt: skip
    return table


def _print_report(report: Any, console: Console) -> None:
    console.print(_summary_table(report))
    reasons = ", ".join(f"{n:,} {r}" for r, n in sorted(report.reasons.items())) or "nothing to collect"
    console.print(
        f"{report.objects_listed:,} objects listed, {report.commits_read:,} chunk headers read, "
        f"{report.chunks_reachable:,} chunks reachable; garbage: {reasons}; "
        f"grace {report.grace:g}s; took {report.elapsed:.2f}s"
    )
    if report.bytes_after is not None:
        budget = f" (budget {fmt_bytes(report.max_bytes)})" if report.max_bytes is not None else ""
        console.print(
            f"eviction: {fmt_bytes(report.bytes_before_eviction)} under chunks/ after the sweep, "
            f"{fmt_bytes(report.bytes_after)} after evicting {report.evicted_chunks:,} chunks{budget}"
        )
    if report.budget_note:
        console.print(f"[yellow]budget not met[/]: {report.budget_note}")
    for mid, why in report.protected_models.items():
        console.print(f"[yellow]left alone[/] model {mid}: {why}")
    if report.checkpoint:
        console.print(f"checkpoint: {report.checkpoint}")


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM stops a run as Ctrl-C does (asyncio cancels it, a checkpoint keeps what was finished)."""

    def interrupt(signum: int, frame: Any) -> None:
        signal.raise_signal(signal.SIGINT)

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@click.command("gc")
@store_arguments
@click.option("--grace", default="1h", show_default=True, help="Only delete garbage older than this (30s, 15m, 1h).")
@click.option(
    "--allow-short-grace",
    is_flag=True,
    help="Accept a grace of 60s or less (the retirement-check interval): it can delete what a writer is saving.",
)
@click.option(
    "--max-bytes",
    default=None,
    metavar="SIZE",
    help="Then evict the least recently used chunks until chunks/ holds at most SIZE (500GiB, 2TB, 800MB).",
)
@click.option(
    "--max-idle",
    default=None,
    metavar="DURATION",
    help="Then evict every chunk not used (itself or through a longer prompt) for this long (7d, 12h).",
)
@click.option("--namespace", default=None, help="Collect the namespace NAME of the store at URL (URL/namespaces/NAME).")
@click.option("--dry-run", is_flag=True, help="Report what would be freed; delete nothing.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before a large deletion.")
@click.option(
    "--confirm-threshold",
    default=DEFAULT_CONFIRM_THRESHOLD,
    show_default=True,
    type=click.IntRange(min=0),
    help="On a terminal without --yes, ask first when more objects than this would be deleted.",
)
@click.option("--concurrency", default=32, show_default=True, type=click.IntRange(min=1), help="Parallel reads.")
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Record finished work in this local file; after Ctrl-C, SIGTERM or a crash the same command resumes there.",
)
@click.option(
    "--metrics-file",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Also write the results in the Prometheus text format here (for node exporter's textfile collector: *.prom).",
)
@click.pass_context
def gc_command(
    ctx: click.Context,
    url: str,
    storage_option: tuple[str, ...],
    as_json: bool,
    grace: str,
    allow_short_grace: bool,
    max_bytes: str | None,
    max_idle: str | None,
    namespace: str | None,
    dry_run: bool,
    yes: bool,
    confirm_threshold: int,
    concurrency: int,
    checkpoint: str | None,
    metrics_file: str | None,
) -> None:
    """Mark and sweep: delete chunks no live model version can reach.

    Garbage is everything under chunks/ of retired (or unknown) model versions,
    damaged data objects, chunks whose chain is broken, stale tail
    markers and temporary files. Only objects older than --grace are deleted, so
    writers that are saving right now never lose a chunk; it must exceed the 60 s
    retirement-check interval unless --allow-short-grace.

    With --max-bytes and/or --max-idle the run then evicts reachable chunks by
    recency (recorded by every store's loads, lookups and saves in access
    records): the ends of the least recently used chains first, never a chunk
    used within --grace. Exit code 0 when done,
    1 on an error or when some deletion failed; an interrupted run leaves the
    store consistent and running it again finishes the job. With --checkpoint
    the run records what it finished (mark and sweep, per listing partition)
    and the same command resumes there, with the first run's cutoff, as long as
    the first run started less than --grace ago.
    """
    from kvstore.errors import InvalidInputError
    from kvstore.gc import GCReport, check_grace, run_gc
    from kvstore.opening import namespace_url

    try:
        url = str(namespace_url(url, namespace))
    except InvalidInputError as exc:
        raise click.BadParameter(str(exc), param_hint="--namespace") from exc
    options = parse_options(storage_option, url)
    grace_s = parse_duration(grace)
    budget = None if max_bytes is None else _param(parse_size, max_bytes, "--max-bytes")
    idle = None if max_idle is None else _param(parse_duration, max_idle, "--max-idle")
    try:
        check_grace(grace_s, allow_short_grace, override="--allow-short-grace")
    except InvalidInputError as exc:
        raise click.BadParameter(str(exc), param_hint="--grace") from exc
    interactive = is_terminal() and not as_json
    console = make_console()

    def one_run(dry: bool, checkpoint: str | None = None) -> GCReport:
        progress = RichProgress(None if not as_json else False)

        async def work() -> GCReport:
            with progress.shown():
                return await run_gc(
                    url,
                    storage_options=options,
                    grace=grace_s,
                    dry_run=dry,
                    progress=progress,
                    concurrency=concurrency,
                    allow_short_grace=allow_short_grace,
                    max_bytes=budget,
                    max_idle=idle,
                    checkpoint=checkpoint,
                )

        with _sigterm_interrupts():
            return run_async(ctx, work)

    if not dry_run and not yes and interactive:
        plan = one_run(True)
        if plan.freed_objects > confirm_threshold:
            _print_report(plan, console)
            click.confirm(
                f"Delete {plan.freed_objects:,} objects ({fmt_bytes(plan.freed_bytes)}) from {url}?", abort=True
            )
        elif plan.freed_objects == 0:
            _print_report(plan, console)
            if metrics_file is not None:
                _write_metrics(metrics_file, plan)
            return
    report = one_run(dry_run, checkpoint)
    if metrics_file is not None:
        _write_metrics(metrics_file, report)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        _print_report(report, console)
    if not report.ok:
        for failure in report.failures[:10]:
            click.echo(f"kvstore: could not delete {failure.key}: {failure.error}", err=True)
        click.echo(f"kvstore: error: {report.failures_total:,} objects could not be deleted", err=True)
        ctx.exit(EXIT_ERROR)


def _param(parse: Any, value: str, hint: str) -> Any:
    try:
        return parse(value)
    except click.BadParameter as exc:
        raise click.BadParameter(exc.message, param_hint=hint) from None


def _write_metrics(path: str, report: Any) -> None:
    try:
        from kvstore.metrics import write_gc_metrics
    except ImportError as exc:
        raise click.UsageError(f"--metrics-file: {exc}") from exc
    try:
        write_gc_metrics(path, report)
    except OSError as exc:
        raise click.ClickException(f"could not write --metrics-file {path}: {exc}") from exc


@click.command("retire")
@store_arguments
@click.argument("model", metavar="NAME@VERSION")
@click.option("--reason", default=None, help="Why (recorded in the retirement record).")
@click.option("--by", default=None, help="Who or what retires it (default: user@host).")
@click.pass_context
def retire_command(
    ctx: click.Context,
    url: str,
    storage_option: tuple[str, ...],
    as_json: bool,
    model: str,
    reason: str | None,
    by: str | None,
) -> None:
    """Mark a model version retired: saves under it fail and the next gc reclaims its chunks.

    Retirement is final (a new weights release gets a new version). Retiring an
    already retired version changes nothing and reports the first retirement.
    """
    name, version = parse_model(model)
    options = parse_options(storage_option, url)

    async def work() -> list[kvstore.ModelInfo]:
        async with kvstore.open(url, storage_options=options, create=False) as store:
            return await store.retire(name, version, by=by, reason=reason)

    retired = run_async(ctx, work)
    rows: list[dict[str, Any]] = [
        {
            "name": m.spec.name,
            "version": m.spec.version,
            "model_id": m.model_id.hex(),
            "status": m.status,
            "retired_at": m.retired_at,
            "retired_by": m.retired_by,
            "reason": m.reason,
        }
        for m in retired
    ]
    if as_json:
        click.echo(json.dumps({"url": url, "retired": rows}, indent=2))
        return
    for row in rows:
        click.echo(
            f"retired {row['name']}@{row['version']} ({row['model_id']}) at {fmt_time(row['retired_at'])} UTC "
            f"by {row['retired_by']}" + (f": {row['reason']}" if row["reason"] else "")
        )
