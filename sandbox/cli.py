"""``idv-sandbox``: run the sandbox provider until SIGTERM or SIGINT.

API keys come from ``--api-key`` (repeatable), ``IDV_SANDBOX_API_KEYS`` (comma-separated) and
``IDV_SANDBOX_API_KEYS_FILE`` (a file of keys, one per line or comma-separated), all merged; the
same goes for ``--out-of-credit-key`` / ``IDV_SANDBOX_OUT_OF_CREDIT_KEYS[_FILE]``. Every other
option can also be set by the ``IDV_SANDBOX_*`` variable shown in ``--help``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import click

from .config import PROFILES, DiditConfig, SandboxConfig
from .errors import SandboxConfigError
from .faults import FaultConfig
from .server import SandboxServer
from .webhooks import WebhookFaults

__all__ = ["main"]

log = logging.getLogger(__name__)

_ENV = "IDV_SANDBOX_"
_F = TypeVar("_F", bound=Callable[..., Any])


def _split(text: str) -> list[str]:
    return [part.strip() for line in text.splitlines() for part in line.split(",") if part.strip()]


def _collect_keys(flags: Iterable[str], env_name: str) -> tuple[str, ...]:
    """Keys from the flags, ``<env_name>`` (comma-separated) and ``<env_name>_FILE``, deduplicated."""
    keys = [k.strip() for k in flags if k.strip()]
    keys += _split(os.environ.get(env_name, ""))
    keys_file = os.environ.get(f"{env_name}_FILE")
    if keys_file:
        try:
            keys += _split(Path(keys_file).read_text(encoding="utf-8"))
        except OSError as exc:
            raise click.UsageError(f"cannot read {env_name}_FILE: {exc.strerror}") from None
    return tuple(dict.fromkeys(keys))


def _write_ready_file(path: Path, url: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(url + "\n", encoding="utf-8")
    tmp.replace(path)


async def _serve(config: SandboxConfig, ready_file: Path | None) -> None:
    server = SandboxServer(config)
    try:
        await server.start()
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {config.host}:{config.port}: {exc.strerror}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        if ready_file is not None:
            _write_ready_file(ready_file, server.url)
        click.echo(f"idv-sandbox listening on {server.url}", err=True)
        await stop.wait()
        log.info("shutting down")
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await server.stop()


def _option(flag: str, *names: str, **kwargs: Any) -> Callable[[_F], _F]:
    """A click option also read from ``IDV_SANDBOX_<FLAG>`` (shown in ``--help``)."""
    envvar = _ENV + flag.removeprefix("--").replace("-", "_").upper()
    return click.option(flag, *names, envvar=envvar, show_envvar=True, **kwargs)


_RATE = click.FloatRange(0, 1)
_NON_NEGATIVE = click.FloatRange(min=0)
_POSITIVE = click.IntRange(min=1)


def _rate_option(flag: str, help: str) -> Callable[[_F], _F]:
    """A probability or share: a float in [0, 1], off (0) unless given."""
    return _option(flag, type=_RATE, default=0.0, help=help)


def _webhook_faults(options: dict[str, Any]) -> WebhookFaults:
    """The ``--webhook-<fault>`` options are the :class:`WebhookFaults` fields of the same name; taken out
    of ``options``. The fault rolls share ``--seed``."""
    names = [f"webhook_{f.name}" for f in fields(WebhookFaults)]
    chosen = {name.removeprefix("webhook_"): options.pop(name) for name in names if name in options}
    return WebhookFaults(**chosen, seed=options.get("seed"))


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@_option(
    "--profile",
    type=click.Choice(PROFILES),
    default="ietf",
    help="ietf: Idempotency-Key provider (IETF draft). didit: Didit's v3 contract (no key; sessions "
    "dedupe by vendor_data; multipart checks; list/decision endpoints; simulated applicant and webhooks).",
)
@_option("--host", default="127.0.0.1", help="Address to bind.")
@_option("--port", default=8080, type=click.IntRange(0, 65535), help="0 picks a free port.")
@click.option(
    "--api-key",
    "api_keys",
    multiple=True,
    help=f"Accepted API key (repeatable; also {_ENV}API_KEYS or {_ENV}API_KEYS_FILE).",
)
@click.option(
    "--out-of-credit-key",
    "out_of_credit_keys",
    multiple=True,
    help=f"API key answered with 403 (repeatable; also {_ENV}OUT_OF_CREDIT_KEYS).",
)
@_option(
    "--latency-ms",
    type=_NON_NEGATIVE,
    default=0.0,
    help="Delay before business handling, so requests stay in flight.",
)
@_option(
    "--latency-jitter-ms", type=_NON_NEGATIVE, default=0.0, help="Extra random delay, uniform in [0, this]."
)
@_rate_option("--error-rate", help="Probability of an injected gateway 500.")
@_rate_option("--rate-429", help="Probability of an injected gateway 429.")
@_option(
    "--retry-after", "retry_after_s", type=_POSITIVE, default=1, help="Retry-After seconds of injected 429s."
)
@_rate_option(
    "--drop-after-effect-rate",
    "Probability of closing the connection after the side effect, without answering.",
)
@_option("--script", default="", help="Comma-separated fault script, e.g. '500,500,ok' or 'drop' or '429:2'.")
@_option(
    "--rate-limit-per-min",
    type=_POSITIVE,
    default=None,
    help="Requests per minute per API key (default: unlimited).",
)
@_option(
    "--rate-limit-burst",
    type=_POSITIVE,
    default=None,
    help="Token bucket capacity (default: the per-minute rate).",
)
@_option(
    "--idempotency-ttl",
    type=click.FloatRange(min=0, min_open=True),
    default=24 * 3600.0,
    help="Seconds an idempotency key is remembered.",
)
@_option("--seed", type=int, default=None, help="Seed of the fault rolls.")
@_option(
    "--read-faults/--no-read-faults",
    default=False,
    help="didit: inject faults on the read-only endpoints (list, decision) too.",
)
@_option(
    "--max-body-mb",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Largest request body in MiB (default: 8 for ietf, 32 for didit).",
)
@_option(
    "--applicant-delay-ms",
    type=_NON_NEGATIVE,
    default=None,
    help="didit: the simulated applicant opens a new session after half this, decides after all of it "
    "(default: never; sessions move only through /_admin).",
)
@_option("--applicant-jitter-ms", type=_NON_NEGATIVE, default=0.0, help="didit: extra random delay per step.")
@_rate_option("--abandon-rate", help="didit: share of sessions the applicant abandons.")
@_option("--webhook-url", default=None, help="didit: where signed status.updated/data.updated webhooks go.")
@_option(
    "--webhook-secret",
    default=None,
    show_default=False,
    help=f"didit: webhook secret key the deliveries are signed with (or {_ENV}WEBHOOK_SECRET_FILE).",
)
@_option("--webhook-max-attempts", type=_POSITIVE, default=4, help="didit: delivery attempts per event.")
@_option(
    "--webhook-backoff-ms",
    type=_NON_NEGATIVE,
    default=500.0,
    help="didit: wait before the first retry, doubled after.",
)
@_option(
    "--webhook-timeout-s",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    help="didit: total time one delivery attempt may take.",
)
@_rate_option("--webhook-drop-rate", help="didit: share of events never delivered.")
@_rate_option("--webhook-duplicate-rate", help="didit: share of events delivered twice.")
@_rate_option("--webhook-reorder-rate", help="didit: share of events held back behind later ones.")
@_rate_option(
    "--webhook-bad-signature-rate",
    "didit: share of events preceded by a forged delivery (every signature wrong).",
)
@_option("--webhook-delay-ms", type=_NON_NEGATIVE, default=0.0, help="didit: wait before a first delivery.")
@_option(
    "--ready-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the bound URL here once listening (removed on exit).",
)
@_option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    help="DEBUG logs one line per request.",
)
def main(
    profile: str,
    host: str,
    port: int,
    api_keys: tuple[str, ...],
    out_of_credit_keys: tuple[str, ...],
    rate_limit_per_min: int | None,
    rate_limit_burst: int | None,
    idempotency_ttl: float,
    ready_file: Path | None,
    log_level: str,
    max_body_mb: float | None,
    applicant_delay_ms: float | None,
    applicant_jitter_ms: float,
    abandon_rate: float,
    webhook_url: str | None,
    webhook_secret: str | None,
    webhook_max_attempts: int,
    webhook_backoff_ms: float,
    webhook_timeout_s: float,
    **options: Any,
) -> None:
    """Sandbox identity-verification provider (Didit-style v3 API) with an exactly-once ledger."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keys = _collect_keys(api_keys, f"{_ENV}API_KEYS")
    broke_keys = _collect_keys(out_of_credit_keys, f"{_ENV}OUT_OF_CREDIT_KEYS")
    if not keys:
        raise click.UsageError(f"no API key: pass --api-key or set {_ENV}API_KEYS or {_ENV}API_KEYS_FILE")
    secret_file = os.environ.get(f"{_ENV}WEBHOOK_SECRET_FILE")
    if webhook_secret is None and secret_file:
        try:
            webhook_secret = Path(secret_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise click.UsageError(f"cannot read {_ENV}WEBHOOK_SECRET_FILE: {exc.strerror}") from None
    try:
        didit = DiditConfig(
            applicant_delay_s=applicant_delay_ms / 1000 if applicant_delay_ms is not None else None,
            applicant_jitter_s=applicant_jitter_ms / 1000,
            abandon_rate=abandon_rate,
            webhook_url=webhook_url,
            webhook_secret=webhook_secret or None,
            webhook_max_attempts=webhook_max_attempts,
            webhook_backoff_s=webhook_backoff_ms / 1000,
            webhook_timeout_s=webhook_timeout_s,
            webhook_faults=_webhook_faults(options),
            seed=options.get("seed"),
        )
        config = SandboxConfig(
            profile=profile,
            didit=didit,
            max_body_bytes=int(max_body_mb * 1024 * 1024) if max_body_mb is not None else None,
            host=host,
            port=port,
            api_keys=keys,
            out_of_credit_keys=broke_keys,
            rate_limit_per_min=rate_limit_per_min,
            rate_limit_burst=rate_limit_burst,
            idempotency_ttl_s=idempotency_ttl,
            # Every other option is a FaultConfig field of the same name.
            faults=FaultConfig(**options),
        )
    except SandboxConfigError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        asyncio.run(_serve(config, ready_file))
    finally:
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)
