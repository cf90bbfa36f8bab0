"""``idv-consumer``: run the daemon, inspect the dedupe store, replay topics and redrive dead letters."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import click
import orjson
from click.decorators import FC

from consumer.errors import ConfigurationError, ReplayRefused, StoreError
from consumer.exits import EXIT_CONFIG, EXIT_REFUSED
from consumer.gcpolicy import tune_gc
from consumer.logs import configure
from consumer.settings import Settings
from consumer.store import DedupeStore, open_store

if TYPE_CHECKING:
    from consumer.tools.dlq import DeadLetterEntry
    from consumer.tools.report import Report

T = TypeVar("T")


def _settings(require_key: bool = True) -> Settings:
    try:
        if require_key:
            return Settings.from_env()
        return Settings.from_env(provider_api_key="-")
    except ConfigurationError as exc:
        click.echo(f"idv-consumer: configuration error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)


def event_loop_options(choice: str) -> dict[str, Any]:
    """anyio backend options for ``IDV_EVENT_LOOP``: uvloop when asked for (or, for ``auto``, when it is
    installed), else the standard asyncio loop."""
    if choice == "asyncio":
        return {}
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if choice == "uvloop":
            raise ConfigurationError(
                "IDV_EVENT_LOOP=uvloop needs the uvloop package (pip install uvloop)"
            ) from None
        return {}
    return {"use_uvloop": True}


@click.group()
def main() -> None:
    """Exactly-once identity-verification consumer. Settings come from IDV_* variables
    (see docs/configuration.md)."""


@main.command()
def run() -> None:
    """Run the consumer daemon until SIGTERM/SIGINT."""
    from consumer.daemon import Daemon

    settings = _settings()
    configure(settings.log_level, settings.log_format)

    async def main_() -> int:
        return await Daemon(settings).run()

    tune_gc()
    try:
        code = anyio.run(main_, backend_options=event_loop_options(settings.event_loop))
    except ConfigurationError as exc:
        click.echo(f"idv-consumer: {exc}", err=True)
        sys.exit(exc.exit_code)
    except StoreError as exc:
        click.echo(f"idv-consumer: dedupe store: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    sys.exit(code)


def _with_store(fn: Callable[[DedupeStore], Awaitable[object]]) -> None:
    """Open the configured store, run ``fn`` on it and print its result as JSON; one line and exit 2 when
    the settings or the store fail."""
    settings = _settings(require_key=False)

    async def main_() -> object:
        async with open_store(settings.store_url) as store:
            return await fn(store)

    try:
        out = anyio.run(main_)
    except (ConfigurationError, StoreError) as exc:
        click.echo(f"idv-consumer: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    click.echo(orjson.dumps(out).decode())


@main.command()
@click.option("--key", "key", default=None, help="Show one record by idempotency key.")
def status(key: str | None) -> None:
    """Print record counts per state (or one record) from the dedupe store as JSON."""

    async def show(store: DedupeStore) -> object:
        if not key:
            return {"records": await store.counts(), "conflicts": len(await store.conflicts())}
        record = await store.get(key)
        if record is None:
            return None
        return {
            "key": record.key,
            "message_id": record.message_id,
            "operation": record.operation,
            "state": record.state.value,
            "attempts": record.attempts,
            "outcome": record.outcome.to_json() if record.outcome else None,
            "last_error": record.last_error,
        }

    _with_store(show)


@main.command("show")
@click.argument("message_id")
@click.option("--operation", default=None, help="The request's operation (default: every registered one).")
@click.option(
    "--since",
    default="7d",
    show_default=True,
    help="Scan the dead-letter and results topics from this time (ISO 8601, or 2h, 7d).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def show_message(message_id: str, operation: str | None, since: str, as_json: bool) -> None:
    """One request's story: its dedupe records (every key generation), conflicts, dead letters and result
    events with their partition/offset. Never payloads; keys are shown hashed. Exit 1 when nothing is found.
    """
    from consumer.tools.show import Story, show

    settings = _settings(require_key=False)
    _tool_logging(settings, False)
    start, _ = _times(since, None)
    assert start is not None

    async def main_() -> Story:
        return await show(settings, message_id, operation=operation, since=start)

    story = _run_tool(main_)
    click.echo(orjson.dumps(story.to_json()).decode() if as_json else story.text())
    sys.exit(0 if story.found else 1)


@main.command()
def purge() -> None:
    """Delete dedupe records past IDV_RETENTION_S now (the daemon also does it every IDV_PURGE_INTERVAL_S)."""

    async def purge_(store: DedupeStore) -> object:
        return {"purged": await store.purge_expired()}

    _with_store(purge_)


# -- replay and dead letters (docs/replay.md, docs/dead-letters.md) ------------------------------------


def _tool_logging(settings: Settings, verbose: bool) -> None:
    # The pipeline logs one line per message at INFO; next to a progress bar only warnings are useful.
    level = settings.log_level if verbose else "WARNING"
    configure(level, "text" if sys.stderr.isatty() else settings.log_format)


def _times(since: str | None, until: str | None) -> tuple[datetime | None, datetime | None]:
    from consumer.tools.spans import parse_time

    try:
        return (parse_time(since) if since else None, parse_time(until) if until else None)
    except ReplayRefused as exc:
        raise click.BadParameter(str(exc)) from None


def _finish(report: Report, as_json: bool) -> None:
    if as_json:
        click.echo(orjson.dumps(report.to_json()).decode())
    else:
        click.echo(report.table())
    sys.exit(report.exit_code)


def _run_tool(fn: Callable[[], Awaitable[T]]) -> T:
    try:
        return anyio.run(fn)
    except ReplayRefused as exc:
        click.echo(f"idv-consumer: refused: {exc}", err=True)
        sys.exit(EXIT_REFUSED)
    except (ConfigurationError, StoreError) as exc:
        click.echo(f"idv-consumer: {exc}", err=True)
        sys.exit(EXIT_REFUSED)
    except BaseExceptionGroup as group:
        # A store or configuration failure inside the concurrent handlers arrives wrapped in a group.
        known, rest = group.split((ConfigurationError, StoreError))
        if known is None or rest is not None:
            raise
        first: BaseException = known
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        click.echo(f"idv-consumer: {first}", err=True)
        sys.exit(EXIT_REFUSED)


def _offset_option(flag: str, dest: str, which: str) -> Callable[[FC], FC]:
    help_text = (
        f"{which} offset (inclusive). Once for every partition, or once per --partition in the same order."
    )
    return click.option(flag, dest, type=click.IntRange(min=0), multiple=True, help=help_text)


_PROGRESS_HELP = "Progress on stderr: a bar with ETA on a terminal, plain lines otherwise (default: on)."


@main.command()
@click.option("--topic", default=None, help="Topic to replay (default: the first of IDV_TOPIC).")
@click.option(
    "--partition",
    "partitions",
    type=click.IntRange(min=0),
    multiple=True,
    help="Partition to replay; repeat for several (default: all).",
)
@_offset_option("--from-offset", "from_offsets", "First")
@_offset_option("--to-offset", "to_offsets", "Last")
@click.option(
    "--since", default=None, help="Messages with a timestamp at or after this (ISO 8601, or 2h, 7d)."
)
@click.option("--until", default=None, help="Messages with a timestamp before this (ISO 8601, or 2h, 7d).")
@click.option(
    "--group", default=None, help="The tool's own consumer group (never IDV_GROUP_ID); default: none."
)
@click.option("--dry-run", is_flag=True, help="Classify against the dedupe store; call and write nothing.")
@click.option("--emit-results", is_flag=True, help="Also re-publish result events of completed keys.")
@click.option(
    "--no-dead-letters", is_flag=True, help="Do not write invalid messages and conflicts to the DLQ again."
)
@click.option("--reverify", is_flag=True, help="Run COMPLETED requests again under a new key generation.")
@click.option(
    "--retry-failed",
    is_flag=True,
    help="Run requests whose outcome is FAILED again under a new key generation (audited, like --reverify).",
)
@click.option(
    "--reason", default=None, help="Why (required with --reverify/--retry-failed; written to the audit file)."
)
@click.option(
    "--audit-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path(".run/reverify-audit.jsonl"),
    show_default=True,
    help="JSON Lines audit trail of --reverify and --retry-failed.",
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (--reverify, --retry-failed).")
@click.option("--force", is_flag=True, help="Replay messages older than the dedupe retention anyway.")
@click.option("--concurrency", type=click.IntRange(1, 1000), default=16, show_default=True)
@click.option("--progress/--no-progress", default=True, help=_PROGRESS_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--verbose", is_flag=True, help="Log at IDV_LOG_LEVEL instead of WARNING.")
def replay(
    topic: str | None,
    partitions: tuple[int, ...],
    from_offsets: tuple[int, ...],
    to_offsets: tuple[int, ...],
    since: str | None,
    until: str | None,
    group: str | None,
    dry_run: bool,
    emit_results: bool,
    no_dead_letters: bool,
    reverify: bool,
    retry_failed: bool,
    reason: str | None,
    audit_file: Path,
    yes: bool,
    force: bool,
    concurrency: int,
    progress: bool,
    as_json: bool,
    verbose: bool,
) -> None:
    """Replay a range of the request topic through the daemon's pipeline, without touching the live
    group's offsets. Completed keys are not sent again.

    Exit codes: 0 every message handled, 1 some were not (set aside, interrupted), 2 refused or
    misconfigured (e.g. messages older than IDV_RETENTION_S without --force), 3 provider rejected the key.
    """
    from consumer.tools.replay import ReplayRequest
    from consumer.tools.replay import replay as run_replay
    from consumer.tools.report import progress_factory
    from consumer.tools.reverify import operator_name

    if (since or until) and (from_offsets or to_offsets):
        raise click.UsageError("use either --since/--until or --from-offset/--to-offset, not both")
    if reverify and retry_failed:
        raise click.UsageError("--reverify and --retry-failed cannot be combined")
    flag = "--retry-failed" if retry_failed else "--reverify"
    if (reverify or retry_failed) and dry_run:
        raise click.UsageError(f"{flag} and --dry-run cannot be combined")
    if (reverify or retry_failed) and not (reason and reason.strip()):
        raise click.UsageError(f"{flag} needs --reason TEXT (it is written to the audit file)")
    if dry_run and emit_results:
        raise click.UsageError("--dry-run writes nothing; drop --emit-results")
    settings = _settings(require_key=not dry_run)
    _tool_logging(settings, verbose)
    start, end = _times(since, until)

    def confirm(question: str) -> bool:
        if yes:
            return True
        return click.confirm(question, default=False, err=True)

    request = ReplayRequest(
        topic=topic or settings.topics[0], partitions=partitions, from_offsets=from_offsets,
        to_offsets=to_offsets, since=start, until=end, group=group, dry_run=dry_run,
        emit_results=emit_results, dead_letters=not no_dead_letters, reverify=reverify,
        retry_failed=retry_failed, reason=reason, audit_file=audit_file, operator=operator_name(),
        force=force, concurrency=concurrency,
    )  # fmt: skip

    async def main_() -> Report:
        return await run_replay(settings, request, confirm=confirm, progress=progress_factory(progress))

    _finish(_run_tool(main_), as_json)


@main.group()
def dlq() -> None:
    """Inspect and redrive dead letters (docs/dead-letters.md)."""


@dlq.command("list")
@click.option("--reason", "reasons", multiple=True, help="Only this reason; repeat for several.")
@click.option("--since", default=None, help="Dead-lettered at or after (ISO 8601, or 2h, 7d).")
@click.option("--until", default=None, help="Dead-lettered before (ISO 8601, or 2h, 7d).")
@click.option("--limit", type=click.IntRange(min=0), default=50, show_default=True, help="Newest N.")
def dlq_list(reasons: tuple[str, ...], since: str | None, until: str | None, limit: int) -> None:
    """A table of dead letters: time, reason, original position, attempts, detail. Never payloads."""
    from consumer.tools.dlq import dlq_list as list_letters
    from consumer.tools.dlq import dlq_table

    settings = _settings(require_key=False)
    _tool_logging(settings, False)
    start, end = _times(since, until)

    async def main_() -> tuple[list[DeadLetterEntry], int]:
        return await list_letters(settings, reasons=reasons, since=start, until=end, limit=limit)

    entries, matched = _run_tool(main_)
    click.echo(dlq_table(entries))
    click.echo(f"{len(entries)} shown of {matched} matching dead letter(s)")


@dlq.command()
@click.option("--reason", "reasons", multiple=True, required=True, help="Reason to redrive; repeatable.")
@click.option("--since", default=None, help="Dead-lettered at or after (ISO 8601, or 2h, 7d).")
@click.option("--until", default=None, help="Dead-lettered before (ISO 8601, or 2h, 7d).")
@click.option("--direct", "mode", flag_value="direct", help="Run them through the pipeline here and now.")
@click.option("--republish", "mode", flag_value="republish", help="Write them back to their original topic.")
@click.option("--dry-run", is_flag=True, help="Classify against the dedupe store; call and write nothing.")
@click.option("--emit-results", is_flag=True, help="--direct: also re-publish results of completed keys.")
@click.option("--group", default=None, help="The tool's own consumer group (never IDV_GROUP_ID).")
@click.option(
    "--force",
    is_flag=True,
    help="Redrive messages older than the dedupe retention anyway; with --direct also send in_doubt "
    "records older than IDV_PROVIDER_KEY_RETENTION_S again (risk: a second side effect if the provider "
    "forgot the key after acting).",
)
@click.option("--concurrency", type=click.IntRange(1, 1000), default=16, show_default=True)
@click.option("--progress/--no-progress", default=True, help=_PROGRESS_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--verbose", is_flag=True, help="Log at IDV_LOG_LEVEL instead of WARNING.")
def redrive(
    reasons: tuple[str, ...],
    since: str | None,
    until: str | None,
    mode: str | None,
    dry_run: bool,
    emit_results: bool,
    force: bool,
    group: str | None,
    concurrency: int,
    progress: bool,
    as_json: bool,
    verbose: bool,
) -> None:
    """Redrive dead letters with the given reason(s), once the cause is fixed.

    Exit codes: 0 every selected dead letter handled, 1 some failed again or were not reached, 2 refused
    or misconfigured, 3 provider rejected the key.
    """
    from consumer.sinks import DLQ_REASONS
    from consumer.tools.dlq import RedriveMode
    from consumer.tools.dlq import redrive as run_redrive
    from consumer.tools.report import progress_factory

    if mode is None:
        raise click.UsageError("choose --direct or --republish")
    unknown = sorted(set(reasons) - set(DLQ_REASONS))
    if unknown:
        raise click.UsageError(f"unknown reason(s) {unknown}; known: {', '.join(DLQ_REASONS)}")
    if emit_results and mode != "direct":
        raise click.UsageError("--emit-results goes with --direct")
    settings = _settings(require_key=not dry_run and mode == "direct")
    _tool_logging(settings, verbose)
    start, end = _times(since, until)

    async def main_() -> Report:
        return await run_redrive(
            settings,
            reasons=reasons,
            mode=RedriveMode(mode),
            since=start,
            until=end,
            group=group,
            dry_run=dry_run,
            emit_results=emit_results,
            force=force,
            concurrency=concurrency,
            progress=progress_factory(progress),
        )

    _finish(_run_tool(main_), as_json)
