"""How one ``idv-publish`` command runs: its summary, progress bar, duplicate count, windowed publishing
and exit status (0 all published, 1 some input invalid, 2 usage error or broker failure)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio
import click
import orjson
from tqdm import tqdm  # type: ignore[import-untyped]  # tqdm ships no type information

from producer.envelope import Envelope
from producer.errors import PublishError
from producer.publisher import Publisher

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INVALID",
    "EXIT_OK",
    "DuplicateCounter",
    "Progress",
    "Summary",
    "publish_all",
    "run_command",
]

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_FAILURE = 2


@dataclass(slots=True)
class Summary:
    command: str
    topic: str
    published: int = 0
    invalid: int = 0
    duplicate_ids: int = 0
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def as_dict(self) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.started
        out: dict[str, Any] = {
            "command": self.command,
            "topic": self.topic,
            "published": self.published,
            "invalid": self.invalid,
            "duplicate_ids": self.duplicate_ids,
            "elapsed_s": round(elapsed, 3),
            "msg_per_s": round(self.published / elapsed, 1) if elapsed > 0 else 0.0,
        }
        out.update(self.extra)
        if self.error is not None:
            out["error"] = self.error
        return out

    def emit(self, json_output: bool) -> None:
        data = self.as_dict()
        if json_output:
            click.echo(orjson.dumps(data).decode())
            return
        line = (
            f"published {data['published']}, invalid {data['invalid']}, "
            f"duplicate IDs in input {data['duplicate_ids']}, "
            f"{data['elapsed_s']:.2f} s, {data['msg_per_s']:.0f} msg/s"
        )
        if "seed" in data:
            line += f" (seed {data['seed']})"
        click.echo(line, err=True)


class Progress:
    """A tqdm bar on stderr, only when stderr is a terminal; notes are printed without breaking it."""

    def __init__(self, total: int | None) -> None:
        stream = sys.stderr
        self._bar = tqdm(
            total=total,
            unit="msg",
            unit_scale=True,
            file=stream,
            disable=not stream.isatty(),
            dynamic_ncols=True,
        )

    def update(self, n: int) -> None:
        self._bar.update(n)

    def note(self, message: str) -> None:
        if self._bar.disable:
            click.echo(message, err=True)
        else:
            self._bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self._bar.close()


class DuplicateCounter:
    """Counts envelopes whose message ID already appeared earlier in the same input."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self.count = 0

    def add(self, message_id: str) -> None:
        if message_id in self._seen:
            self.count += 1
        else:
            self._seen.add(message_id)


async def publish_all(
    publisher: Publisher, envelopes: Iterable[Envelope], summary: Summary, progress: Progress
) -> None:
    window: list[Envelope] = []
    for envelope in envelopes:
        window.append(envelope)
        if len(window) >= publisher.window:
            summary.published += len(await publisher.publish_many(window))
            progress.update(len(window))
            window = []
    if window:
        summary.published += len(await publisher.publish_many(window))
        progress.update(len(window))


def run_command(
    summary: Summary,
    json_output: bool,
    work: Callable[[Progress], Coroutine[Any, Any, None]],
    total: int | None,
) -> None:
    """Run one command's coroutine; report the summary and exit with the documented status."""
    progress = Progress(total)
    status = EXIT_OK
    try:
        anyio.run(work, progress)
    except PublishError as exc:
        summary.error = str(exc)
        status = EXIT_FAILURE
    finally:
        progress.close()
    if summary.error is not None:
        click.echo(f"error: {summary.error} (published {summary.published} before the failure)", err=True)
    elif summary.invalid:
        status = EXIT_INVALID
    summary.emit(json_output)
    sys.exit(status)
