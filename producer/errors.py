"""Exceptions of the ``idv-exactly-once`` distribution.

One root for everything the producer and the consumer raise, so callers can catch the whole family.
The root lives here, in the contract package: the consumer imports ``producer``, never the other way
round, so this is the one module both sides can share. Consumer exit codes: :mod:`consumer.exits`. ::

    VerificationError
    ├── EnvelopeError                      a message does not follow the wire contract (reason code)
    │   ├── EnvelopeTooLarge               encoded size over the limit
    │   └── UnknownOperation               operation not in the registry
    ├── PublishError                       the broker did not accept a message (retriable per cause)
    ├── producer.documents.DocumentFileError  a file cannot be stored as a document (idv-publish --document)
    └── consumer.errors.ConsumerError      (the consumer's classes are defined in ``consumer.errors``)
        ├── ConfigurationError             invalid settings or environment; not started (exit 2)
        │   ├── BrokerUnavailable          Kafka unreachable or refusing the connection (exit 4)
        │   ├── StoreUnavailable           the dedupe store cannot be opened at start-up (exit 5)
        │   └── TopicMissing               a request, dead-letter or results topic is missing (exit 6)
        ├── ReplayRefused                  the replay/dlq tool refuses the request (exit 2)
        ├── StoreError                     a dedupe store operation failed (retriable)
        ├── LeaseLost                      the record is no longer ours (lease taken over)
        ├── webhooks.SignatureRejected     a webhook delivery is not provably Didit's or not fresh (401)
        ├── webhooks.EventNotDurable       Kafka did not acknowledge a webhook event (503, retriable)
        ├── consumer.documents.DocumentError  a referenced document cannot be used (reason = DLQ reason)
        │   └── DocumentUnavailable        the document store failed in a way that may pass (retriable)
        └── ProviderError                  a provider call failed
            ├── ProviderAuthError          401/403: the API key is rejected; stops the daemon (exit 3)
            │   └── ProviderConfigError    3xx/405/endpoint 404: wrong URL or API version (exit 3)
            ├── ProviderInDoubt            422 key reused: the provider may have acted; dead-lettered
            │   └── UnreconciledAttempt    no dedupe, earlier attempt not found by lookup: dead-lettered
            ├── ProviderNotFound           404 from a read-only lookup (get_decision)
            ├── ProviderRetriableError     5xx, 409, 429, timeouts, connection errors (retriable)
            └── RetriesExhausted           retriable failures past the ceiling; set aside

``retriable`` says whether trying the same thing again can succeed (as aiokafka's ``KafkaError``); the
pipeline's store calls retry exactly the errors that say so. Flow control (a duplicate skipped, a message
set aside) is not an exception. ``consumer.sinks.Unwritable`` (a record the broker will never accept) and
``consumer.sinks.Fenced`` (another producer took the transactional id; the daemon turns it into a
ConfigurationError, exit 2) are caught inside the daemon and still derive from ``Exception``; they belong
under ConsumerError. The sandbox provider (``sandbox.errors.SandboxError``) stands in for the
third-party provider and keeps a root of its own.
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
