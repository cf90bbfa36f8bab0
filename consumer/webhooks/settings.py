"""Settings of the webhook intake service (``idv-webhooks``): one frozen object from ``IDV_*`` variables.

The same conventions as the daemon's :class:`consumer.settings.Settings`, reading through the same base
(:class:`consumer.envreader.EnvSettings`): a field
``name`` is the variable ``IDV_NAME``; a secret may be given as ``IDV_NAME_FILE``; the Kafka address and
the TLS/SASL variables are the daemon's own (``IDV_KAFKA_*``, checked by :mod:`consumer.security`), so one
environment configures both. Invalid values raise :class:`ConfigurationError` with one line naming the
variable. Every variable is documented in docs/configuration.md ("Webhook intake").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from consumer.envreader import KafkaSettings, check_logging, need
from consumer.webhooks.signature import DEFAULT_WINDOW_S

__all__ = ["DEFAULT_EVENTS_TOPIC", "DEFAULT_PATH", "DEFAULT_PORT", "WebhookSettings"]

DEFAULT_EVENTS_TOPIC = "idv.provider-events"
DEFAULT_PATH = "/webhooks/didit"
DEFAULT_PORT = 9410
_SECRETS = frozenset({"webhook_secret", "webhook_secret_previous", "kafka_sasl_password"})


@dataclass(frozen=True, slots=True)
class WebhookSettings(KafkaSettings):
    SECRETS: ClassVar[frozenset[str]] = _SECRETS
    # Kafka: the daemon's own variables (KafkaSettings, consumer/envreader.py)
    # Where accepted events go (key = session_id, value = the body as received).
    events_topic: str = DEFAULT_EVENTS_TOPIC
    webhook_client_id: str = "idv-webhooks"
    # HTTP
    webhook_host: str = "127.0.0.1"
    webhook_port: int = DEFAULT_PORT
    webhook_path: str = DEFAULT_PATH
    webhook_max_body_bytes: int = 1_000_000
    # Didit's destination secret, and the one it replaced while a rotation is under way.
    webhook_secret: str = field(default="", repr=False)
    webhook_secret_previous: str = field(default="", repr=False)
    webhook_timestamp_window_s: float = DEFAULT_WINDOW_S
    # An accepted delivery is answered 2xx only once the broker acknowledged it; past this, 503.
    webhook_publish_timeout_s: float = 5.0
    # On SIGTERM: how long requests already received may take to finish (their produce included).
    webhook_drain_timeout_s: float = 15.0
    log_level: str = "INFO"
    log_format: str = "json"

    def validate(self) -> None:
        need(bool(self.kafka_bootstrap), "kafka_bootstrap", "must not be empty")
        need(bool(self.events_topic.strip()), "events_topic", "must not be empty")
        need(
            bool(self.webhook_secret),
            "webhook_secret",
            "is required (set IDV_WEBHOOK_SECRET or IDV_WEBHOOK_SECRET_FILE to the destination's secret)",
        )
        need(
            self.webhook_secret_previous != self.webhook_secret,
            "webhook_secret_previous",
            "is the same as IDV_WEBHOOK_SECRET (leave it unset when no rotation is under way)",
        )
        need(0 <= self.webhook_port <= 65535, "webhook_port", "must be a port number (0: any free port)")
        need(
            self.webhook_path.startswith("/") and " " not in self.webhook_path,
            "webhook_path",
            "must be an absolute URL path such as /webhooks/didit",
        )
        need(
            self.webhook_path not in ("/healthz", "/readyz", "/metrics"),
            "webhook_path",
            "must not be one of the operations paths (/healthz, /readyz, /metrics)",
        )
        need(
            1024 <= self.webhook_max_body_bytes <= 16 * 1024 * 1024,
            "webhook_max_body_bytes",
            "must be between 1024 and 16777216",
        )
        need(self.webhook_timestamp_window_s > 0, "webhook_timestamp_window_s", "must be positive")
        need(self.webhook_publish_timeout_s > 0, "webhook_publish_timeout_s", "must be positive")
        need(self.webhook_drain_timeout_s > 0, "webhook_drain_timeout_s", "must be positive")
        check_logging(self.log_level, self.log_format)
        self.kafka_security()  # raises ConfigurationError naming the IDV_KAFKA_* variable

    @property
    def secrets(self) -> tuple[str, ...]:
        """The accepted signing secrets, current first."""
        return tuple(s for s in (self.webhook_secret, self.webhook_secret_previous) if s)
