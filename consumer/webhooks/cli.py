"""``idv-webhooks``: the webhook intake service's command line (settings from ``IDV_*`` variables)."""

from __future__ import annotations

import sys
from typing import Any

import anyio
import click

from consumer.errors import ConfigurationError
from consumer.exits import EXIT_CONFIG
from consumer.logs import configure
from consumer.webhooks.service import run
from consumer.webhooks.settings import WebhookSettings


@click.command()
@click.option("--host", default=None, help="Bind address (overrides IDV_WEBHOOK_HOST).")
@click.option("--port", type=int, default=None, help="Bind port, 0 for any (overrides IDV_WEBHOOK_PORT).")
@click.option("--path", default=None, help="Webhook URL path (overrides IDV_WEBHOOK_PATH).")
def main(host: str | None, port: int | None, path: str | None) -> None:
    """Receive Didit's signed webhooks and publish each accepted one to the events topic, answering 2xx
    only after Kafka acknowledged it. Stops gracefully on SIGTERM/SIGINT. See docs/webhooks.md."""
    overrides: dict[str, Any] = {
        name: value
        for name, value in (("webhook_host", host), ("webhook_port", port), ("webhook_path", path))
        if value is not None
    }
    try:
        settings = WebhookSettings.from_env(**overrides)
    except ConfigurationError as exc:
        click.echo(f"idv-webhooks: configuration error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    configure(settings.log_level, settings.log_format)
    try:
        anyio.run(run, settings)
    except ConfigurationError as exc:
        click.echo(f"idv-webhooks: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:  # a second Ctrl-C while draining
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
