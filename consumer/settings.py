"""Daemon settings: one frozen object, read from ``IDV_*`` environment variables.

Every variable is documented in docs/configuration.md (a test keeps the two in step). A secret may be
given as ``NAME_FILE`` pointing at a file instead of ``NAME``. Invalid values raise
:class:`ConfigurationError` with one line naming the variable; the CLI prints it and exits 2. How
variables, secret files and ``IDV_CONFIG_FILE`` are read is :mod:`consumer.envreader`; the rules a value
must satisfy are :mod:`consumer.settings_rules`.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, ClassVar

from consumer.envreader import PREFIX, KafkaSettings, read_env
from consumer.settings_rules import LEASE_SLACK_S, MIN_FINGERPRINT_KEY, check

if TYPE_CHECKING:
    from consumer.dlqcrypto import DeadLetterCipher

# PREFIX, read_env and MIN_FINGERPRINT_KEY are re-exported for older callers.
__all__ = ["LEASE_SLACK_S", "MIN_FINGERPRINT_KEY", "PREFIX", "Settings", "read_env"]

_SECRETS = frozenset(
    {
        "provider_api_key",
        "provider_signing_secret",
        "kafka_sasl_password",
        "fingerprint_key",
        "store_url",
        "dlq_encryption_keys",
        "documents_token",
    }
)


@dataclass(frozen=True, slots=True)
class Settings(KafkaSettings):
    SECRETS: ClassVar[frozenset[str]] = _SECRETS
    READS_CONFIG_FILE: ClassVar[bool] = True
    # Kafka: kafka_bootstrap and the TLS/SASL fields are KafkaSettings' (consumer/envreader.py)
    topic: str = "idv.requests"
    group_id: str = "idv-verifier"
    client_id: str = "idv-consumer"
    auto_offset_reset: str = "earliest"
    fetch_max_records: int = 500
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    max_poll_interval_ms: int = 300_000
    # Processing
    namespace: str = "idv"
    # HMAC key of request fingerprints (consumer/keys.py); required. Changing it turns redeliveries of
    # messages recorded under the old key into conflicts until those records expire.
    fingerprint_key: str = field(default="", repr=False)
    instance_id: str = field(default_factory=socket.gethostname)
    # Workers, and the ceiling of provider calls in flight (consumer/concurrency.py). Workers are cheap
    # tasks; the adaptive limit decides how many of them may call the provider at once.
    max_in_flight: int = 4096
    # 0 = follow the ceiling: max(1024, 2 × IDV_MAX_IN_FLIGHT).
    max_buffered: int = 0
    # "adaptive": the provider concurrency limit moves between concurrency_min and max_in_flight from the
    # measured latency and 429s; "fixed": always max_in_flight.
    concurrency: str = "adaptive"
    concurrency_min: int = 8
    max_message_bytes: int = 1024 * 1024
    commit_interval_s: float = 1.0
    commit_every: int = 500
    drain_timeout_s: float = 20.0
    rebalance_drain_s: float = 10.0
    # Where handled messages go: empty = "<first topic>.dlq" / "<first topic>.results"; "none" disables.
    dlq_topic: str = ""
    results_topic: str = ""
    # Publish result events and commit offsets in one Kafka transaction (see docs/guarantees.md).
    results_transactional: bool = False
    # AES-256-GCM keys for dead-letter values, "kid:base64key,…", the first encrypts (consumer/dlqcrypto.py);
    # empty: dead letters are written in clear.
    dlq_encryption_keys: str = field(default="", repr=False)
    # Dedupe store (the URL may hold the database password: never in repr, logs or errors)
    store_url: str = field(default="sqlite:///.run/dedupe.db", repr=False)
    lease_s: float = 60.0
    retention_s: float = 30 * 24 * 3600.0
    purge_interval_s: float = 3600.0
    # Provider
    # The provider profile (consumer/providers/, docs/providers.md): "ietf" (an Idempotency-Key provider:
    # the sandbox, Stripe, Persona), "didit" (Didit's v3 API, no idempotency key: reconciled by lookup),
    # "signed" (ietf plus an HMAC signature on every request).
    provider: str = "ietf"
    provider_url: str = "http://127.0.0.1:8080"
    provider_api_key: str = field(default="", repr=False)
    # HMAC secret of IDV_PROVIDER=signed (X-Signature); may be given as IDV_PROVIDER_SIGNING_SECRET_FILE.
    provider_signing_secret: str = field(default="", repr=False)
    provider_timeout_s: float = 10.0
    provider_max_attempts: int = 6
    provider_backoff_base_s: float = 0.2
    provider_backoff_max_s: float = 10.0
    # 0 = follow the ceiling (IDV_MAX_IN_FLIGHT).
    provider_max_connections: int = 0
    # Client-side token bucket in front of every attempt: requests/s (0 = off) and burst (0 = rate / 10).
    provider_rate_limit: float = 0.0
    provider_rate_burst: float = 0.0
    # Ceiling on a Retry-After hint: longer ones are obeyed only up to this (a gateway's "come back in a
    # day" must not park a partition for a day).
    provider_retry_after_max_s: float = 60.0
    # How long the provider keeps an Idempotency-Key (the sandbox and Persona: 24 h). An unfinished record
    # that was already sent and is older than this is not sent again automatically: dead-lettered in_doubt.
    provider_key_retention_s: float = 24 * 3600.0
    # A key that could be resent after that retention (lease + retries + take-over; see
    # consumer/providers/checks.py): "refuse" to start (exit 2), or "warn" and run unprotected.
    provider_retention_check: str = "refuse"
    # "aiohttp": httpx's API on an aiohttp connection pool (consumer/http.py); "httpx-aiohttp": the same
    # through that package (optional); "httpx": httpcore's own pool, which degrades past ~16-64 concurrent
    # requests (docs/performance.md).
    provider_transport: str = "aiohttp"
    event_loop: str = "auto"
    # Documents referenced by envelopes (consumer/documents.py): local: references under this directory,
    # http(s): references under one of the comma-separated URL prefixes (empty: none), with this bearer
    # token; the size limit and timeout of one document.
    documents_dir: str = ".run/documents"
    documents_http_allow: str = ""
    documents_token: str = field(default="", repr=False)
    documents_max_bytes: int = 10 * 1024 * 1024
    documents_timeout_s: float = 30.0
    breaker_failure_ratio: float = 0.5
    breaker_min_calls: int = 20
    breaker_open_s: float = 5.0
    # Health and metrics endpoint (/metrics, /healthz, /readyz); port -1 disables it, 0 picks a free port.
    health_host: str = "127.0.0.1"
    health_port: int = 9400
    stall_after_s: float = 120.0
    # Logging
    log_level: str = "INFO"
    log_format: str = "json"
    # OpenTelemetry spans per message (the tracing extra; consumer/tracing.py). Exporter, endpoint and
    # service name come from the standard OTEL_* variables.
    tracing: bool = False
    # Workflows (consumer/workflows/): the provider events topic (consumed when it exists; "none" off),
    # the polling fallback and the abandon deadline.
    events_topic: str = "idv.provider-events"
    workflow_poll_after_s: float = 600.0
    workflow_poll_max_s: float = 3600.0
    workflow_abandon_after_s: float = 7 * 24 * 3600.0
    workflow_scan_interval_s: float = 5.0
    workflow_poll_concurrency: int = 16
    # Testing only: "<fault point>:<n>" SIGKILLs the process the n-th time that point is reached.
    fault_kill_at: str = ""

    def __post_init__(self) -> None:
        # Defaults that follow the ceiling when left unset (0).
        if self.max_buffered == 0:
            object.__setattr__(self, "max_buffered", max(1024, 2 * self.max_in_flight))
        if self.provider_max_connections == 0:
            object.__setattr__(self, "provider_max_connections", self.max_in_flight)

    def validate(self) -> None:
        check(self)  # consumer/settings_rules.py

    @property
    def documents_http_allow_list(self) -> list[str]:
        return [p.strip() for p in self.documents_http_allow.split(",") if p.strip()]

    @property
    def topics(self) -> list[str]:
        return [t.strip() for t in self.topic.split(",") if t.strip()]

    def _derived(self, value: str, suffix: str) -> str | None:
        if value.lower() == "none":
            return None
        return value or f"{self.topics[0]}.{suffix}"

    @property
    def dead_letter_topic(self) -> str | None:
        return self._derived(self.dlq_topic, "dlq")

    @property
    def result_topic(self) -> str | None:
        return self._derived(self.results_topic, "results")

    @property
    def provider_events_topic(self) -> str | None:
        """The provider events topic, or None (``IDV_EVENTS_TOPIC=none``)."""
        return None if self.events_topic.lower() in ("", "none") else self.events_topic

    @property
    def store_url_redacted(self) -> str:
        """The store URL without its password, for logs and messages."""
        from consumer.store import redact_url

        return redact_url(self.store_url)

    def dlq_cipher(self) -> DeadLetterCipher | None:
        """The dead-letter cipher (None without ``IDV_DLQ_ENCRYPTION_KEYS``); imports ``cryptography``."""
        from consumer.dlqcrypto import cipher_from_settings

        return cipher_from_settings(self.dlq_encryption_keys)

    def __repr__(self) -> str:
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.repr)
        return f"Settings({shown}, store_url={self.store_url_redacted!r})"
