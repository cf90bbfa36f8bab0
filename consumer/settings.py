"""Daemon settings: one frozen object, read from ``IDV_*`` environment variables.

Every variable is documented in docs/configuration.md (a test keeps the two in step). A secret may be
given as ``NAME_FILE`` pointing at a file instead of ``NAME``. Invalid values raise
:class:`ConfigurationError` with one line naming the variable; the CLI prints it and exits 2.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from consumer.errors import ConfigurationError

if TYPE_CHECKING:
    from consumer.dlqcrypto import DeadLetterCipher

__all__ = ["LEASE_SLACK_S", "PREFIX", "Settings"]

PREFIX = "IDV_"
T = TypeVar("T")
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
#: Shortest accepted IDV_FINGERPRINT_KEY (characters): a short key can be guessed along with the data.
MIN_FINGERPRINT_KEY = 16
# What a lease must hold beyond one attempt's hard deadline: the lease is made sure of right before an
# attempt, so this covers the store write that records the answer (and clock jitter) after the deadline.
LEASE_SLACK_S = 1.0


def _secret(env: Mapping[str, str], name: str) -> str | None:
    file_var = f"{PREFIX}{name}_FILE"
    if file_var in env:
        try:
            return Path(env[file_var]).read_text().strip()
        except OSError as exc:
            raise ConfigurationError(f"{file_var}: cannot read {env[file_var]!r}: {exc.strerror}") from None
    return env.get(PREFIX + name)


def read_env(
    env: Mapping[str, str],
    converters: Mapping[str, Callable[[str], Any]],
    secrets: frozenset[str],
    values: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``values`` overlaid with each field's ``IDV_<NAME>`` (a secret also from ``IDV_<NAME>_FILE``),
    converted; an unset or empty variable leaves the value as it was, a bad one names its variable."""
    out = dict(values or {})
    for name, convert in converters.items():
        var = PREFIX + name.upper()
        raw = _secret(env, name.upper()) if name in secrets else env.get(var)
        if raw is None or raw == "":
            continue
        try:
            out[name] = convert(raw)
        except ValueError:
            raise ConfigurationError(f"{var}: invalid value (expected {convert.__name__})") from None
    return out


@dataclass(frozen=True, slots=True)
class Settings:
    # Kafka
    kafka_bootstrap: str = "127.0.0.1:9092"
    topic: str = "idv.requests"
    group_id: str = "idv-verifier"
    client_id: str = "idv-consumer"
    auto_offset_reset: str = "earliest"
    fetch_max_records: int = 500
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    max_poll_interval_ms: int = 300_000
    # Kafka security (passed to aiokafka; see consumer/security.py)
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str = ""
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = field(default="", repr=False)
    kafka_ssl_cafile: str = ""
    kafka_ssl_certfile: str = ""
    kafka_ssl_keyfile: str = ""
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

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if env is None else env
        converters: dict[str, Callable[[str], Any]] = {}
        for f in fields(cls):
            factory: Any = f.default_factory
            default = factory() if f.default is MISSING else f.default
            converters[f.name] = _converter(type(default))
        # Precedence: built-in defaults < IDV_CONFIG_FILE < environment variables < explicit overrides.
        values = read_env(
            env, converters, _SECRETS, _config_file(env.get(PREFIX + "CONFIG_FILE"), converters)
        )
        values.update(overrides)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        def need(cond: bool, var: str, why: str) -> None:
            if not cond:
                raise ConfigurationError(f"{PREFIX}{var.upper()}: {why}")

        need(bool(self.kafka_bootstrap), "kafka_bootstrap", "must not be empty")
        need(bool(self.topic), "topic", "must not be empty")
        need(bool(self.group_id), "group_id", "must not be empty")
        need(
            self.auto_offset_reset in ("earliest", "latest", "none"),
            "auto_offset_reset",
            "must be earliest, latest or none",
        )
        need(
            bool(self.provider_api_key),
            "provider_api_key",
            "is required (set IDV_PROVIDER_API_KEY or IDV_PROVIDER_API_KEY_FILE)",
        )
        need(
            bool(self.fingerprint_key),
            "fingerprint_key",
            "is required (set IDV_FINGERPRINT_KEY or IDV_FINGERPRINT_KEY_FILE to a random secret, "
            "e.g. `openssl rand -hex 32`)",
        )
        need(
            len(self.fingerprint_key) >= MIN_FINGERPRINT_KEY,
            "fingerprint_key",
            f"must be at least {MIN_FINGERPRINT_KEY} characters",
        )
        need(self.provider_url.startswith(("http://", "https://")), "provider_url", "must be an http(s) URL")
        need(1 <= self.max_in_flight <= 10_000, "max_in_flight", "must be between 1 and 10000")
        need(
            self.max_in_flight <= self.max_buffered <= 100_000,
            "max_buffered",
            "must be at least IDV_MAX_IN_FLIGHT and at most 100000",
        )
        need(self.concurrency in ("adaptive", "fixed"), "concurrency", "must be adaptive or fixed")
        # A floor above the ceiling is the ceiling (a small IDV_MAX_IN_FLIGHT keeps the default floor valid).
        need(self.concurrency_min >= 1, "concurrency_min", "must be at least 1")
        need(self.provider_rate_limit >= 0, "provider_rate_limit", "must be 0 (off) or positive")
        need(self.provider_rate_burst >= 0, "provider_rate_burst", "must be 0 (rate / 10) or positive")
        need(self.fetch_max_records >= 1, "fetch_max_records", "must be at least 1")
        need(self.provider_max_attempts >= 1, "provider_max_attempts", "must be at least 1")
        need(self.provider_max_connections >= 1, "provider_max_connections", "must be at least 1")
        need(
            self.provider_transport in ("httpx", "aiohttp", "httpx-aiohttp"),
            "provider_transport",
            "must be aiohttp, httpx-aiohttp or httpx",
        )
        need(
            self.event_loop in ("auto", "uvloop", "asyncio"), "event_loop", "must be auto, uvloop or asyncio"
        )
        need(self.commit_interval_s > 0, "commit_interval_s", "must be positive")
        need(self.commit_every >= 1, "commit_every", "must be at least 1")
        need(self.retention_s > self.lease_s, "retention_s", "must be longer than the lease")
        need(self.provider_timeout_s > 0, "provider_timeout_s", "must be positive")
        need(
            self.lease_s >= self.provider_timeout_s + LEASE_SLACK_S,
            "lease_s",
            f"must be at least IDV_PROVIDER_TIMEOUT_S + {LEASE_SLACK_S:g}s (the hard deadline of one attempt "
            "plus renewal slack) so a live call never outlasts its lease",
        )
        need(self.provider_retry_after_max_s > 0, "provider_retry_after_max_s", "must be positive")
        need(self.provider_key_retention_s > 0, "provider_key_retention_s", "must be positive")
        need(
            self.provider_retention_check in ("refuse", "warn"),
            "provider_retention_check",
            "must be refuse or warn",
        )
        from consumer.providers import adapter_from_settings

        adapter_from_settings(self)  # raises ConfigurationError naming IDV_PROVIDER or its secret
        need(self.log_format in ("json", "text"), "log_format", "must be json or text")
        need(
            self.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
            "log_level",
            "must be DEBUG, INFO, WARNING or ERROR",
        )
        need(self.max_message_bytes >= 1024, "max_message_bytes", "must be at least 1024")
        need(
            not self.results_transactional or self.result_topic is not None,
            "results_transactional",
            "needs a results topic",
        )
        need(self.documents_max_bytes >= 1, "documents_max_bytes", "must be at least 1")
        need(self.documents_timeout_s > 0, "documents_timeout_s", "must be positive")
        if self.documents_http_allow_list:
            from consumer.document_http import parse_allow_list

            try:
                parse_allow_list(self.documents_http_allow_list)
            except ValueError as exc:
                need(False, "documents_http_allow", str(exc))
        need(0 < self.breaker_failure_ratio <= 1, "breaker_failure_ratio", "must be in (0, 1]")
        need(self.breaker_min_calls >= 1, "breaker_min_calls", "must be at least 1")
        need(self.breaker_open_s > 0, "breaker_open_s", "must be positive")
        need(self.namespace.isascii() and bool(self.namespace), "namespace", "must be non-empty ASCII")
        need(-1 <= self.health_port <= 65535, "health_port", "must be a port number, 0 (any) or -1 (off)")
        need(self.stall_after_s > 0, "stall_after_s", "must be positive")
        need(self.workflow_poll_after_s > 0, "workflow_poll_after_s", "must be positive")
        need(
            self.workflow_poll_max_s >= self.workflow_poll_after_s,
            "workflow_poll_max_s",
            "must be at least IDV_WORKFLOW_POLL_AFTER_S",
        )
        need(self.workflow_abandon_after_s > 0, "workflow_abandon_after_s", "must be positive")
        need(self.workflow_scan_interval_s > 0, "workflow_scan_interval_s", "must be positive")
        need(1 <= self.workflow_poll_concurrency <= 1000, "workflow_poll_concurrency", "must be 1..1000")
        need(self.purge_interval_s >= 0, "purge_interval_s", "must be 0 (off) or positive")
        if self.dlq_encryption_keys.strip():
            from consumer.dlqcrypto import parse_keys

            parse_keys(self.dlq_encryption_keys)  # raises ConfigurationError naming the variable, no key
        if self.tracing:
            from consumer import tracing

            need(
                tracing.available(),
                "tracing",
                "needs the tracing extra: pip install 'idv-exactly-once[tracing]'",
            )
        self.kafka_security()  # raises ConfigurationError naming the IDV_KAFKA_* variable

    def kafka_security(self) -> dict[str, Any]:
        """aiokafka keyword arguments for TLS/SASL (contains the password: never log it)."""
        from consumer.security import kafka_security_kwargs

        return kafka_security_kwargs(
            self.kafka_security_protocol,
            self.kafka_sasl_mechanism,
            self.kafka_sasl_username,
            self.kafka_sasl_password,
            self.kafka_ssl_cafile,
            self.kafka_ssl_certfile,
            self.kafka_ssl_keyfile,
        )

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

    def env_names(self) -> list[str]:
        return [PREFIX + f.name.upper() for f in fields(self)]

    @staticmethod
    def secret_file_names() -> list[str]:
        """The ``*_FILE`` variables (secrets that may be given as a file)."""
        return sorted(f"{PREFIX}{name.upper()}_FILE" for name in _SECRETS)


def _config_file(path: str | None, converters: Mapping[str, Callable[[str], Any]]) -> dict[str, Any]:
    """Settings from a TOML file: top-level keys named like the settings (``max_in_flight = 64``),
    optionally under an ``[idv]`` table. Unknown keys are an error, not silently ignored."""
    if not path:
        return {}
    import tomllib

    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigurationError(f"{PREFIX}CONFIG_FILE: cannot read {path!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{PREFIX}CONFIG_FILE: {path} is not valid TOML ({exc})") from None
    table = data.get("idv", data)
    if not isinstance(table, dict):
        raise ConfigurationError(f"{PREFIX}CONFIG_FILE: [idv] must be a table")
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in converters:
            raise ConfigurationError(f"{PREFIX}CONFIG_FILE: unknown setting {key!r} in {path}")
        if isinstance(value, dict | list):
            raise ConfigurationError(f"{PREFIX}CONFIG_FILE: {key} must be a single value")
        try:
            values[key] = converters[key](str(value).lower() if isinstance(value, bool) else str(value))
        except ValueError:
            raise ConfigurationError(f"{PREFIX}CONFIG_FILE: {key}: invalid value") from None
    return values


def _converter(kind: type) -> Callable[[str], Any]:
    if kind is bool:

        def to_bool(raw: str) -> bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)

        to_bool.__name__ = "a boolean"
        return to_bool
    if kind is int:

        def to_int(raw: str) -> int:
            return int(raw.strip())

        to_int.__name__ = "an integer"
        return to_int
    if kind is float:

        def to_float(raw: str) -> float:
            return float(raw.strip())

        to_float.__name__ = "a number"
        return to_float

    def to_str(raw: str) -> str:
        return raw.strip()

    to_str.__name__ = "a string"
    return to_str
