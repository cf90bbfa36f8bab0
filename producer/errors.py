"""Exceptions of the ``idv-exactly-once`` distribution.

One root for everything either package raises, so callers can catch the whole family::

    VerificationError
    ├── EnvelopeError                  a message does not follow the wire contract
    │   ├── EnvelopeTooLarge           encoded size over the limit
    │   └── UnknownOperation           operation not in the registry
    ├── PublishError                   the broker did not accept a message
    └── consumer.errors.ConsumerError  (defined in ``consumer.errors``)
        ├── ConfigurationError         invalid settings; the daemon does not start
        ├── StoreError                 the dedupe store failed (retriable)
        └── ProviderError              the provider call failed
            ├── ProviderAuthError      401/403: configuration, stops the daemon
            ├── ProviderRetriableError 5xx, 409, 429, timeouts, connection errors
            └── RetriesExhausted       retriable failures past the ceiling

``retriable`` says whether trying the same thing again can succeed (as aiokafka's ``KafkaError``).
Flow control (a duplicate skipped, a message set aside) is not an exception.
"""

from __future__ import annotations


class VerificationError(Exception):
    """Root of every exception raised by this distribution."""

    retriable: bool = False


class EnvelopeError(VerificationError, ValueError):
    """The message does not follow the wire contract.

    ``reason`` is a stable machine-readable code (it becomes the dead-letter reason);
    the message text names the field and never contains field *values*.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class EnvelopeTooLarge(EnvelopeError):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__("too_large", f"encoded message is {size} bytes, limit is {limit}")
        self.size = size
        self.limit = limit


class UnknownOperation(EnvelopeError):
    def __init__(self, operation: str) -> None:
        shown = operation if len(operation) <= 64 else operation[:64] + "..."
        super().__init__("unknown_operation", f"unknown operation {shown!r}")
        self.operation = operation


class PublishError(VerificationError):
    retriable = True
