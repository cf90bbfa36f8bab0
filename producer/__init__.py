"""Wire contract and publisher for identity-verification requests."""

from __future__ import annotations

from producer.envelope import (
    DOCUMENT_KEY,
    HEADER_MESSAGE_ID,
    HEADER_OPERATION,
    HEADER_SCHEMA_VERSION,
    MAX_DOCUMENT_URI_LENGTH,
    MAX_ID_LENGTH,
    MAX_INLINE_IMAGE_CHARS,
    MAX_MESSAGE_BYTES,
    OPERATIONS,
    SCHEMA_VERSION,
    Envelope,
    Operation,
    canonical_request,
    decode,
    encode,
    envelope_from_dict,
    get_operation,
    register_operation,
)
from producer.errors import (
    EnvelopeError,
    EnvelopeTooLarge,
    PublishError,
    UnknownOperation,
    VerificationError,
)
from producer.ids import new_message_id, uuid7
from producer.publisher import Publisher, PublishResult
from producer.samples import sample_envelopes

__all__ = [
    "DOCUMENT_KEY",
    "HEADER_MESSAGE_ID",
    "HEADER_OPERATION",
    "HEADER_SCHEMA_VERSION",
    "MAX_DOCUMENT_URI_LENGTH",
    "MAX_ID_LENGTH",
    "MAX_INLINE_IMAGE_CHARS",
    "MAX_MESSAGE_BYTES",
    "OPERATIONS",
    "SCHEMA_VERSION",
    "Envelope",
    "EnvelopeError",
    "EnvelopeTooLarge",
    "Operation",
    "PublishError",
    "PublishResult",
    "Publisher",
    "UnknownOperation",
    "VerificationError",
    "canonical_request",
    "decode",
    "encode",
    "envelope_from_dict",
    "get_operation",
    "new_message_id",
    "register_operation",
    "sample_envelopes",
    "uuid7",
]
