"""Exceptions raised by the consumer daemon (tree drawn in :mod:`producer.errors`)."""

from __future__ import annotations

from producer.errors import VerificationError


class ConsumerError(VerificationError):
    """Root of the consumer's exceptions."""


class ConfigurationError(ConsumerError):
    """Settings are invalid or the environment is unusable; the daemon does not start or stops.

    ``exit_code`` is what ``idv-consumer run`` exits with (docs/configuration.md, "Exit codes")."""

    exit_code = 2


class BrokerUnavailable(ConfigurationError):
    """Kafka cannot be reached, or refused the connection settings (address, TLS, SASL)."""

    exit_code = 4


class StoreUnavailable(ConfigurationError):
    """The dedupe store cannot be opened at start-up."""

    exit_code = 5


class TopicMissing(ConfigurationError):
    """A request, dead-letter or results topic does not exist."""

    exit_code = 6


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


class ProviderRetriableError(ProviderError):
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
