"""``idv-consumer``: run the daemon, inspect the dedupe store."""

from __future__ import annotations

import sys

import anyio
import click
import orjson

from consumer.errors import ConfigurationError, StoreError
from consumer.logs import configure
from consumer.settings import Settings
from consumer.store import open_store


def _settings(require_key: bool = True) -> Settings:
    try:
        if require_key:
            return Settings.from_env()
        return Settings.from_env(provider_api_key="-")
    except ConfigurationError as exc:
        click.echo(f"idv-consumer: configuration error: {exc}", err=True)
        sys.exit(2)


@click.group()
def main() -> None:
    """Exactly-once identity-verification consumer. Settings come from IDV_* variables
    (see docs/configuration.md)."""


@main.command()
def run() -> None:
    """Run the consumer daemon until SIGTERM/SIGINT."""
    from consumer.daemon import EXIT_CONFIG, Daemon

    settings = _settings()
    configure(settings.log_level, settings.log_format)

    async def main_() -> int:
        return await Daemon(settings).run()

    try:
        code = anyio.run(main_)
    except (ConfigurationError, StoreError) as exc:
        click.echo(f"idv-consumer: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    sys.exit(code)


@main.command()
@click.option("--key", "key", default=None, help="Show one record by idempotency key.")
def status(key: str | None) -> None:
    """Print record counts per state (or one record) from the dedupe store as JSON."""
    settings = _settings(require_key=False)

    async def main_() -> None:
        async with open_store(settings.store_url) as store:
            if key:
                record = await store.get(key)
                out: object = None
                if record is not None:
                    out = {
                        "key": record.key,
                        "message_id": record.message_id,
                        "operation": record.operation,
                        "state": record.state.value,
                        "attempts": record.attempts,
                        "outcome": record.outcome.to_json() if record.outcome else None,
                        "last_error": record.last_error,
                    }
            else:
                out = {"records": await store.counts(), "conflicts": len(await store.conflicts())}
            click.echo(orjson.dumps(out).decode())

    try:
        anyio.run(main_)
    except (ConfigurationError, StoreError) as exc:
        click.echo(f"idv-consumer: {exc}", err=True)
        sys.exit(2)
