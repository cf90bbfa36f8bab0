"""The webhook intake's lifecycle: start-up checks, serving, and the graceful stop.

Start: the Kafka connection is checked with the configured TLS/SASL settings (one clear line on failure,
exit 4), the idempotent producer starts, the events topic must exist (exit 6), then the HTTP port is bound
(exit 2 if it cannot be). Only then is a delivery accepted.

Stop (SIGTERM/SIGINT), in this order, because a 2xx must never be written for a record the broker does not
have and a delivery already received must not be cut off half-way:

1. ``/readyz`` turns 503 (draining) and the listening socket closes: no new connections.
2. Requests already received finish, each with its produce and acknowledgement, for up to
   IDV_WEBHOOK_DRAIN_TIMEOUT_S; idle keep-alive connections are closed. A request still running at the
   deadline is cancelled without an answer: the provider retries it.
3. The producer flushes and closes.
"""

from __future__ import annotations

import logging
import os
import signal

import anyio
from aiohttp import web

from consumer.errors import BrokerUnavailable, ConfigurationError, TopicMissing
from consumer.lifecycle import AsyncService
from consumer.security import check_kafka_connection
from consumer.webhooks.app import Intake
from consumer.webhooks.metrics import WebhookMetrics
from consumer.webhooks.publisher import EventNotDurable, EventPublisher
from consumer.webhooks.settings import WebhookSettings
from consumer.webhooks.signature import WebhookVerifier
from consumer.wiring import watch_signals

log = logging.getLogger(__name__)

__all__ = ["WebhookService", "run"]

# Idle keep-alive connections are closed after this (the provider reconnects per delivery anyway).
_KEEPALIVE_S = 15.0
# After an early answer (408, 413) aiohttp reads what is left of the body for up to this long before it
# closes (its default, 10 s, would hold the drain at shutdown too).
_LINGER_S = 1.0


def _bind_error(host: str, port: int, exc: OSError) -> ConfigurationError:
    reason = os.strerror(exc.errno) if exc.errno else (exc.strerror or type(exc).__name__)
    return ConfigurationError(f"IDV_WEBHOOK_PORT: cannot listen on {host}:{port} ({reason})")


class WebhookService(AsyncService):
    """``async with WebhookService(settings) as service:`` starts everything (errors are raised there, as
    :class:`ConfigurationError` subclasses carrying the exit code) and, on exit, stops it gracefully."""

    def __init__(self, settings: WebhookSettings, *, metrics: WebhookMetrics | None = None) -> None:
        self.settings = settings
        self._security = settings.kafka_security()  # built once: it reads the TLS files
        self.publisher = EventPublisher(
            settings.kafka_bootstrap,
            settings.events_topic,
            security=self._security,
            client_id=settings.webhook_client_id,
            timeout_s=settings.webhook_publish_timeout_s,
            # Room for the record's key and headers beside the largest body accepted.
            max_request_size=settings.webhook_max_body_bytes + 64 * 1024,
        )
        self.intake = Intake(
            WebhookVerifier(settings.secrets, window_s=settings.webhook_timestamp_window_s),
            self.publisher,
            metrics,
            path=settings.webhook_path,
            max_body_bytes=settings.webhook_max_body_bytes,
        )
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    @property
    def port(self) -> int:
        if self._site is None:
            raise RuntimeError("the webhook service is not started")
        return self._site.port

    @property
    def url(self) -> str:
        host = self.settings.webhook_host
        if host in ("", "0.0.0.0", "::"):  # noqa: S104 - a wildcard bind is reached through loopback
            host = "127.0.0.1"
        return f"http://{host}:{self.port}{self.settings.webhook_path}"

    async def start(self) -> None:
        s = self.settings
        try:
            await check_kafka_connection(s.kafka_bootstrap, self._security, client_id=s.webhook_client_id)
        except ConfigurationError as exc:
            raise BrokerUnavailable(str(exc)) from None
        try:
            await self.publisher.start()
            exists = await self.publisher.topic_exists()
        except EventNotDurable as exc:
            await self.publisher.stop()
            raise BrokerUnavailable(str(exc)) from None
        if not exists:
            await self.publisher.stop()
            raise TopicMissing(f"IDV_EVENTS_TOPIC: topic {s.events_topic} does not exist on the broker")
        runner = web.AppRunner(
            self.intake.app(),
            access_log=None,
            shutdown_timeout=s.webhook_drain_timeout_s,
            keepalive_timeout=_KEEPALIVE_S,
            lingering_time=_LINGER_S,
        )
        await runner.setup()
        site = web.TCPSite(runner, s.webhook_host or None, s.webhook_port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            await self.publisher.stop()
            raise _bind_error(s.webhook_host, s.webhook_port, exc) from None
        self._runner, self._site = runner, site
        log.info(
            "webhook intake listening on %s",
            self.url,
            extra={
                "topic": s.events_topic,
                "secrets": len(s.secrets),
                "window_s": s.webhook_timestamp_window_s,
            },
        )

    async def stop(self) -> None:
        """Drain and close (idempotent); never raises."""
        runner, self._runner, self._site = self._runner, None, None
        self.intake.draining = True
        with anyio.CancelScope(shield=True):
            if runner is not None:
                try:
                    await runner.cleanup()  # stop listening, finish in-flight requests, close connections
                except Exception:
                    log.exception("webhook intake: error while draining HTTP requests")
            await self.publisher.stop()
        log.info("webhook intake stopped")



async def run(settings: WebhookSettings) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully."""

    def stopping(signum: signal.Signals) -> None:
        log.info("%s received: draining", signum.name)

    async with WebhookService(settings):
        await watch_signals(stopping)
