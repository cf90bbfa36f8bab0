"""Exceptions raised by the consumer daemon and its tools.

The whole tree, rooted at :class:`producer.errors.VerificationError`, is drawn in :mod:`producer.errors`
(the root lives in the contract package, which the consumer imports and which never imports the
consumer). Exit codes come from :mod:`consumer.exits`.
"""

from __future__ import annotations

from consumer.exits import EXIT_BROKER, EXIT_CONFIG, EXIT_STORE, EXIT_TOPIC_MISSING
from producer.errors import VerificationError


class ConsumerError(VerificationError):
    """Root of the consumer's exceptions."""


class ConfigurationError(ConsumerError):
    """Settings are invalid or the environment is unusable; the daemon does not start or stops.

    ``exit_code`` is what ``idv-consumer run`` exits with (docs/configuration.md, "Exit codes")."""

    exit_code = EXIT_CONFIG


class BrokerUnavailable(ConfigurationError):
    """Kafka cannot be reached, or refused the connection settings (address, TLS, SASL)."""

    exit_code = EXIT_BROKER


class StoreUnavailable(ConfigurationError):
    """The dedupe store cannot be opened at start-up."""

    exit_code = EXIT_STORE


class TopicMissing(ConfigurationError):
    """A request, dead-letter or results topic does not exist."""

    exit_code = EXIT_TOPIC_MISSING


class ReplayRefused(ConsumerError):
    """The replay or dlq tool will not do what was asked (exit 2); the message says why and what to do
    instead."""


class StoreError(ConsumerError):
    """The dedupe store failed; the operation may be retried."""

    retriable = True


class LeaseLost(ConsumerError):
    """A compare-and-set found the record no longer owned by us (lease expired and taken over)."""


class ProviderError(ConsumerError):
    """A provider call failed."""


class ProviderAuthError(ProviderError):
    """401/403: the API key is wrong, revoked or out of credit. Not a per-message failure."""

    def __init__(self, status: int) -> None:
        super().__init__(
            f"provider rejected the API key (HTTP {status}); check IDV_PROVIDER_API_KEY and the account"
        )
        self.status = status


class ProviderConfigError(ProviderAuthError):
    """3xx, 405, or a 404 for the endpoint itself: the provider URL or API version is wrong. Stops the
    daemon like a rejected key (exit code 3), instead of recording every message of the backlog FAILED."""

    def __init__(self, status: int, path: str) -> None:
        ProviderError.__init__(
            self,
            f"provider answered HTTP {status} for {path}: the endpoint is not there "
            "(check IDV_PROVIDER_URL: base URL, API version, a redirecting proxy)",
        )
        self.status = status


class ProviderInDoubt(ProviderError):
    """The provider says the key was used for a different request (422 ``idempotency_key_reused``): it may
    have acted under this key, so the outcome is unknown. Dead-lettered ``in_doubt``, never FAILED."""

    def __init__(self, status: int, code: str, attempts: int) -> None:
        super().__init__(f"provider answered HTTP {status} {code}: the key was used for a different body")
        self.status: int | None = status
        self.code = code
        self.attempts = attempts


class UnreconciledAttempt(ProviderInDoubt):
    """An earlier attempt may have reached a provider that does not dedupe this operation, and it could
    not be looked up (the profile has no lookup, or the lookup kept failing): a new attempt could act a
    second time. Dead-lettered ``in_doubt`` without calling again; an operator decides."""

    def __init__(self, detail: str, attempts: int) -> None:
        ProviderError.__init__(self, detail)
        self.status = None
        self.code = "in_doubt"
        self.attempts = attempts


class ProviderNotFound(ProviderError):
    """A read-only lookup (``get_decision``) named an object the provider does not know (404)."""

    def __init__(self, what: str) -> None:
        super().__init__(f"provider does not know {what} (HTTP 404)")


class ProviderRetriableError(ProviderError):
    """5xx, 409, 429, a timeout or a connection error: the same call with the same key may succeed."""

    retriable = True

    def __init__(self, detail: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.retry_after = retry_after


class RetriesExhausted(ProviderError):
    """Retriable failures went on past the retry ceiling."""

    def __init__(self, attempts: int, last: ProviderRetriableError) -> None:
        super().__init__(f"gave up after {attempts} attempts: {last}")
        self.attempts = attempts
        self.last = last
