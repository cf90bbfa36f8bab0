"""The rules a daemon :class:`~consumer.settings.Settings` must satisfy, one function per group of settings.

:func:`check` runs them in order; the first broken rule raises :class:`~consumer.errors.ConfigurationError`
with one line naming its variable (:func:`consumer.envreader.need`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from consumer.envreader import check_logging, need

if TYPE_CHECKING:
    from consumer.settings import Settings

__all__ = ["LEASE_SLACK_S", "MIN_FINGERPRINT_KEY", "check"]

#: Shortest accepted IDV_FINGERPRINT_KEY (characters): a short key can be guessed along with the data.
MIN_FINGERPRINT_KEY = 16
# What a lease must hold beyond one attempt's hard deadline: the lease is made sure of right before an
# attempt, so this covers the store write that records the answer (and clock jitter) after the deadline.
LEASE_SLACK_S = 1.0


def check(s: Settings) -> None:
    """Every rule, in order: raises ConfigurationError for the first one broken."""
    for group in (_required, _capacity, _provider, _output, _documents, _operations, _workflows, _extras):
        group(s)


def _required(s: Settings) -> None:
    """The broker, the topic and the secrets a daemon cannot run without."""
    need(bool(s.kafka_bootstrap), "kafka_bootstrap", "must not be empty")
    need(bool(s.topic), "topic", "must not be empty")
    need(bool(s.group_id), "group_id", "must not be empty")
    need(
        s.auto_offset_reset in ("earliest", "latest", "none"),
        "auto_offset_reset",
        "must be earliest, latest or none",
    )
    need(
        bool(s.provider_api_key),
        "provider_api_key",
        "is required (set IDV_PROVIDER_API_KEY or IDV_PROVIDER_API_KEY_FILE)",
    )
    need(
        bool(s.fingerprint_key),
        "fingerprint_key",
        "is required (set IDV_FINGERPRINT_KEY or IDV_FINGERPRINT_KEY_FILE to a random secret, "
        "e.g. `openssl rand -hex 32`)",
    )
    need(
        len(s.fingerprint_key) >= MIN_FINGERPRINT_KEY,
        "fingerprint_key",
        f"must be at least {MIN_FINGERPRINT_KEY} characters",
    )
    need(s.provider_url.startswith(("http://", "https://")), "provider_url", "must be an http(s) URL")


def _capacity(s: Settings) -> None:
    """Workers, buffer, concurrency, rate limit, fetch, pool, commits and retention."""
    need(1 <= s.max_in_flight <= 10_000, "max_in_flight", "must be between 1 and 10000")
    need(
        s.max_in_flight <= s.max_buffered <= 100_000,
        "max_buffered",
        "must be at least IDV_MAX_IN_FLIGHT and at most 100000",
    )
    need(s.concurrency in ("adaptive", "fixed"), "concurrency", "must be adaptive or fixed")
    # A floor above the ceiling is the ceiling (a small IDV_MAX_IN_FLIGHT keeps the default floor valid).
    need(s.concurrency_min >= 1, "concurrency_min", "must be at least 1")
    need(s.provider_rate_limit >= 0, "provider_rate_limit", "must be 0 (off) or positive")
    need(s.provider_rate_burst >= 0, "provider_rate_burst", "must be 0 (rate / 10) or positive")
    need(s.fetch_max_records >= 1, "fetch_max_records", "must be at least 1")
    need(s.provider_max_attempts >= 1, "provider_max_attempts", "must be at least 1")
    need(s.provider_max_connections >= 1, "provider_max_connections", "must be at least 1")
    need(
        s.provider_transport in ("httpx", "aiohttp", "httpx-aiohttp"),
        "provider_transport",
        "must be aiohttp, httpx-aiohttp or httpx",
    )
    need(
        s.event_loop in ("auto", "uvloop", "asyncio"), "event_loop", "must be auto, uvloop or asyncio"
    )
    need(s.commit_interval_s > 0, "commit_interval_s", "must be positive")
    need(s.commit_every >= 1, "commit_every", "must be at least 1")
    need(s.retention_s > s.lease_s, "retention_s", "must be longer than the lease")


def _provider(s: Settings) -> None:
    """The provider's deadline against the lease, retries, key retention and profile."""
    need(s.provider_timeout_s > 0, "provider_timeout_s", "must be positive")
    need(
        s.lease_s >= s.provider_timeout_s + LEASE_SLACK_S,
        "lease_s",
        f"must be at least IDV_PROVIDER_TIMEOUT_S + {LEASE_SLACK_S:g}s (the hard deadline of one attempt "
        "plus renewal slack) so a live call never outlasts its lease",
    )
    need(s.provider_retry_after_max_s > 0, "provider_retry_after_max_s", "must be positive")
    need(s.provider_key_retention_s > 0, "provider_key_retention_s", "must be positive")
    need(
        s.provider_retention_check in ("refuse", "warn"),
        "provider_retention_check",
        "must be refuse or warn",
    )
    from consumer.providers import adapter_from_settings

    adapter_from_settings(s)  # raises ConfigurationError naming IDV_PROVIDER or its secret


def _output(s: Settings) -> None:
    """Logging, message size and the results transaction."""
    check_logging(s.log_level, s.log_format)
    need(s.max_message_bytes >= 1024, "max_message_bytes", "must be at least 1024")
    need(
        not s.results_transactional or s.result_topic is not None,
        "results_transactional",
        "needs a results topic",
    )


def _documents(s: Settings) -> None:
    """Documents referenced by envelopes and where they may be fetched from."""
    need(s.documents_max_bytes >= 1, "documents_max_bytes", "must be at least 1")
    need(s.documents_timeout_s > 0, "documents_timeout_s", "must be positive")
    if s.documents_http_allow_list:
        from consumer.document_http import parse_allow_list

        try:
            parse_allow_list(s.documents_http_allow_list)
        except ValueError as exc:
            need(False, "documents_http_allow", str(exc))


def _operations(s: Settings) -> None:
    """Circuit breaker, namespace, health endpoint and stall detection."""
    need(0 < s.breaker_failure_ratio <= 1, "breaker_failure_ratio", "must be in (0, 1]")
    need(s.breaker_min_calls >= 1, "breaker_min_calls", "must be at least 1")
    need(s.breaker_open_s > 0, "breaker_open_s", "must be positive")
    need(s.namespace.isascii() and bool(s.namespace), "namespace", "must be non-empty ASCII")
    need(-1 <= s.health_port <= 65535, "health_port", "must be a port number, 0 (any) or -1 (off)")
    need(s.stall_after_s > 0, "stall_after_s", "must be positive")


def _workflows(s: Settings) -> None:
    """Workflow polling, abandon deadline, scan, and the purge interval."""
    need(s.workflow_poll_after_s > 0, "workflow_poll_after_s", "must be positive")
    need(
        s.workflow_poll_max_s >= s.workflow_poll_after_s,
        "workflow_poll_max_s",
        "must be at least IDV_WORKFLOW_POLL_AFTER_S",
    )
    need(s.workflow_abandon_after_s > 0, "workflow_abandon_after_s", "must be positive")
    need(s.workflow_scan_interval_s > 0, "workflow_scan_interval_s", "must be positive")
    need(1 <= s.workflow_poll_concurrency <= 1000, "workflow_poll_concurrency", "must be 1..1000")
    need(s.purge_interval_s >= 0, "purge_interval_s", "must be 0 (off) or positive")


def _extras(s: Settings) -> None:
    """Optional parts that must be installed or parse: dead-letter keys, tracing, Kafka security."""
    if s.dlq_encryption_keys.strip():
        from consumer.dlqcrypto import parse_keys

        parse_keys(s.dlq_encryption_keys)  # raises ConfigurationError naming the variable, no key
    if s.tracing:
        from consumer import tracing

        need(
            tracing.available(),
            "tracing",
            "needs the tracing extra: pip install 'idv-exactly-once[tracing]'",
        )
    s.kafka_security()  # raises ConfigurationError naming the IDV_KAFKA_* variable
