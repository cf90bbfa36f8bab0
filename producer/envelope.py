"""The wire contract: the JSON envelope of one verification request.

A request travels as one Kafka record:

* **value** – the envelope, a JSON object encoded with orjson::

      {"schema_version": 1,
       "message_id": "01936f0e-...",          # the idempotency anchor, 1..128 chars
       "operation": "aml_screening",           # a name from OPERATIONS
       "subject_id": "applicant-42",           # also the Kafka key
       "correlation_id": "checkout-9",          # optional, for tracing upstream
       "created_at": "2026-11-28T22:00:00.123Z",
       "request": {...}}                        # the body sent to the provider

* **key** – ``subject_id`` in UTF-8, so one applicant's requests share a partition and stay ordered.
* **headers** – ``idv-message-id``, ``idv-operation``, ``idv-schema-version``. When the header
  ``idv-message-id`` is present it must equal the envelope's ``message_id``.

Unknown top-level fields are ignored (a newer producer may add some); an unknown
``schema_version`` is rejected. Errors name the field and never echo field values, since
requests carry personal data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from producer.errors import EnvelopeError, EnvelopeTooLarge, UnknownOperation
from producer.ids import new_message_id

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
    "Operation",
    "canonical_request",
    "decode",
    "encode",
    "envelope_from_dict",
    "get_operation",
    "register_operation",
]

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 1024 * 1024
MAX_ID_LENGTH = 128
MAX_SUBJECT_LENGTH = 256
MAX_CORRELATION_LENGTH = 256

HEADER_MESSAGE_ID = "idv-message-id"
HEADER_OPERATION = "idv-operation"
HEADER_SCHEMA_VERSION = "idv-schema-version"

# Printable, URL- and header-safe; covers UUIDs, ULIDs and most upstream business IDs.
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+=-]*")

#: The key of a document reference, ``{"document": "<uri>"}`` (consumer/documents.py opens it).
DOCUMENT_KEY = "document"
MAX_DOCUMENT_URI_LENGTH = 2048
#: The longest inline image (base64 characters) accepted in an image field: images belong in a document
#: source, referenced by URI, not in Kafka records (docs/documents.md).
MAX_INLINE_IMAGE_CHARS = 64 * 1024
# A URI: a scheme, a colon, then printable ASCII without spaces (percent-encode anything else).
_URI_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[!-~]+")


@dataclass(frozen=True, slots=True)
class Operation:
    """A kind of request and where the provider takes it.

    ``required`` lists request fields that must be non-empty strings; the provider validates the
    rest (its 4xx answers are recorded as outcomes, not retried). ``documents`` lists the fields that
    carry an image: each, when present (and required ones always), is a document reference
    ``{"document": "<uri>"}`` (docs/documents.md) or a small inline base64 string (at most
    :data:`MAX_INLINE_IMAGE_CHARS`); a required field may be either.
    """

    name: str
    path: str
    required: tuple[str, ...] = ()
    # The response field whose value is the provider's reference for the created object.
    reference_field: str = "request_id"
    documents: tuple[str, ...] = ()


OPERATIONS: dict[str, Operation] = {}


def register_operation(operation: Operation) -> Operation:
    """Add an operation to the registry (the set is extensible); returns it."""
    if not _ID_RE.fullmatch(operation.name):
        raise ValueError(f"invalid operation name {operation.name!r}")
    if not operation.path.startswith("/"):
        raise ValueError("operation path must start with '/'")
    OPERATIONS[operation.name] = operation
    return operation


def get_operation(name: str) -> Operation:
    try:
        return OPERATIONS[name]
    except KeyError:
        raise UnknownOperation(name) from None


register_operation(Operation("create_session", "/v3/session/", ("workflow_id",), "session_id"))
register_operation(
    Operation(
        "id_verification",
        "/v3/id-verification/",
        ("document_type", "front_image"),
        documents=("front_image", "back_image"),
    )
)
register_operation(Operation("aml_screening", "/v3/aml/", ("full_name",)))
register_operation(
    Operation("passive_liveness", "/v3/passive-liveness/", ("user_image",), documents=("user_image",))
)
register_operation(
    Operation(
        "face_match",
        "/v3/face-match/",
        ("user_image", "ref_image"),
        documents=("user_image", "ref_image"),
    )
)
# A whole verification (consumer/workflows/, docs/workflows.md): session → decision → AML on approval.
# The path is its first step's; each step has its own idempotency key.
register_operation(Operation("kyc_workflow", "/v3/session/", ("workflow_id",), "session_id"))


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Envelope:
    message_id: str
    operation: str
    subject_id: str
    request: Mapping[str, Any]
    created_at: str = field(default_factory=_now_iso)
    correlation_id: str | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        # The same checks as a decoded envelope's, on the object it will be encoded as (an absent
        # correlation_id reads as None there, as here).
        validate_fields(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema_version": self.schema_version,
            "message_id": self.message_id,
            "operation": self.operation,
            "subject_id": self.subject_id,
            "created_at": self.created_at,
            "request": self.request,
        }
        if self.correlation_id is not None:
            out["correlation_id"] = self.correlation_id
        return out

    @property
    def key(self) -> bytes:
        """The Kafka record key."""
        return self.subject_id.encode()

    def headers(self) -> list[tuple[str, bytes]]:
        return [
            (HEADER_MESSAGE_ID, self.message_id.encode()),
            (HEADER_OPERATION, self.operation.encode()),
            (HEADER_SCHEMA_VERSION, str(self.schema_version).encode()),
        ]


def _invalid(detail: str) -> EnvelopeError:
    return EnvelopeError("invalid_envelope", detail)


def _check_id(name: str, value: object, limit: int, *, missing_reason: str = "invalid_envelope") -> str:
    if value is None or value == "":
        raise EnvelopeError(missing_reason, f"{name} is missing or empty")
    if not isinstance(value, str):
        raise _invalid(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise _invalid(f"{name} is {len(value)} characters, limit is {limit}")
    if not _ID_RE.fullmatch(value):
        raise _invalid(f"{name} has characters outside [A-Za-z0-9._:@/+=-] or starts with a symbol")
    return value


def validate_fields(obj: Mapping[str, Any]) -> None:
    """Check a decoded envelope object; raise :class:`EnvelopeError` naming the first bad field."""
    version = obj.get("schema_version")
    if type(version) is not int:
        raise _invalid("schema_version must be an integer")
    if version != SCHEMA_VERSION:
        raise _invalid(f"unsupported schema_version {version}, this build reads {SCHEMA_VERSION}")
    _check_id("message_id", obj.get("message_id"), MAX_ID_LENGTH, missing_reason="missing_message_id")
    op_name = obj.get("operation")
    if not isinstance(op_name, str) or not op_name:
        raise _invalid("operation must be a non-empty string")
    operation = get_operation(op_name)
    _check_id("subject_id", obj.get("subject_id"), MAX_SUBJECT_LENGTH)
    correlation = obj.get("correlation_id")
    if correlation is not None:
        if not isinstance(correlation, str) or len(correlation) > MAX_CORRELATION_LENGTH:
            raise _invalid(f"correlation_id must be a string of at most {MAX_CORRELATION_LENGTH} characters")
    created = obj.get("created_at")
    if not isinstance(created, str) or len(created) > 64:
        raise _invalid("created_at must be an ISO 8601 timestamp string")
    try:
        parsed = datetime.fromisoformat(created)
    except ValueError:
        raise _invalid("created_at is not an ISO 8601 timestamp") from None
    if parsed.tzinfo is None:
        raise _invalid("created_at must carry a UTC offset")
    request = obj.get("request")
    if not isinstance(request, Mapping):
        raise _invalid("request must be a JSON object")
    for name in operation.required:
        value = request.get(name)
        if name in operation.documents:
            if value is None:
                raise _invalid(f"request.{name} is required for {operation.name}: {_IMAGE_FORM}")
        elif not isinstance(value, str) or not value:
            raise _invalid(f"request.{name} is required for {operation.name} and must be a non-empty string")
    for name in operation.documents:
        if name in request:
            _check_document(name, request[name])
    # The request is encoded again: inside the fingerprint's object (one level down) and as the provider
    # call's body. orjson decodes up to 1024 levels of nesting but encodes only about 250, so a request
    # that decoded fine could still fail there, with a TypeError instead of a reason code. Encode it the
    # deeper of the two ways here, where every path passes.
    try:
        orjson.dumps({"request": request})
    except orjson.JSONEncodeError as exc:
        if "64-bit" in str(exc):
            raise _invalid(_BIG_INT) from None
        raise _invalid("request cannot be encoded as JSON (nested too deeply, or a non-JSON value)") from None


_IMAGE_FORM = (
    'a document reference {"document": "<uri>"} or a base64 string of at most '
    f"{MAX_INLINE_IMAGE_CHARS} characters"
)


def _check_document(name: str, value: object) -> None:
    """An image field: a reference ``{"document": "<uri>"}``, or a small inline (base64) string."""
    if isinstance(value, str):
        if not value:
            raise _invalid(f"request.{name} must be {_IMAGE_FORM}, not empty")
        if len(value) > MAX_INLINE_IMAGE_CHARS:
            raise _invalid(
                f"request.{name} is an inline image of {len(value)} characters, limit is "
                f"{MAX_INLINE_IMAGE_CHARS}: put the image in a document source and send "
                '{"document": "<uri>"} instead (docs/documents.md)'
            )
        return
    if not isinstance(value, Mapping):
        raise _invalid(f"request.{name} must be {_IMAGE_FORM}, got {type(value).__name__}")
    if set(value) != {DOCUMENT_KEY}:
        raise _invalid(f'request.{name} is an object but not a document reference {{"document": "<uri>"}}')
    uri = value[DOCUMENT_KEY]
    if not isinstance(uri, str) or not 1 <= len(uri) <= MAX_DOCUMENT_URI_LENGTH or not _URI_RE.fullmatch(uri):
        raise _invalid(
            f"request.{name}.document must be a URI (scheme:rest, e.g. local:<path> or https://…; printable "
            f"ASCII, at most {MAX_DOCUMENT_URI_LENGTH} characters)"
        )


_BIG_INT = "request holds an integer beyond 64 bits (it would be rounded; send it as a string)"
# orjson decodes an integer literal outside [-2**63, 2**64 - 1] as a float: two different requests would
# then share one fingerprint and one canonical body (PITFALLS). Such a float is the only trace left.
_INT_FLOOR = -(2**63)
_INT_CEILING = 2**64 - 1


def _may_hold_big_int(obj: object) -> bool:
    """True when the decoded object holds a float of a magnitude an out-of-range integer decodes to."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            if abs(item) >= 2.0**63:  # rounding may put -(2**63 + 1) exactly on -(2**63)
                return True
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def check_exact_integers(raw: bytes | str, obj: object) -> None:
    """Raise ``invalid_envelope`` if ``obj`` (``orjson.loads(raw)``) lost an integer beyond 64 bits.

    For producer input parsed before an :class:`Envelope` exists (JSON Lines, ``--request``); ``decode``
    runs the same check on the request."""
    if _may_hold_big_int(obj) and _has_big_int(raw.encode() if isinstance(raw, str) else raw):
        raise _invalid(_BIG_INT)


def _has_big_int(value: bytes) -> bool:
    """Re-read the text with the standard library, which keeps integers exact (rare path)."""
    import json

    found = False

    def check(literal: str) -> int:
        nonlocal found
        number = int(literal)
        if not _INT_FLOOR <= number <= _INT_CEILING:
            found = True
        return number

    try:
        json.loads(value, parse_int=check)
    except ValueError:
        return False
    return found


def canonical_request(envelope: Envelope) -> bytes:
    """The request body exactly as it is fingerprinted and sent: JSON with sorted keys.

    The provider fingerprints the raw body under the ``Idempotency-Key``; sending the canonical bytes
    (not the producer's key order) makes a re-published message with the same content in another key
    order the same request there too, answered from the stored response instead of 422."""
    return orjson.dumps(envelope.request, option=orjson.OPT_SORT_KEYS)


def envelope_from_dict(obj: object) -> Envelope:
    """Build an envelope from producer input, e.g. one parsed JSON Lines object.

    Takes the envelope's fields; ``message_id`` is generated only when the key is absent (an explicit
    ``null`` or ``""`` is rejected as ``missing_message_id``, since it usually means a lost upstream ID),
    ``created_at`` defaults to now and ``schema_version`` to the current one. Unknown fields are ignored,
    as on the wire. Raises :class:`EnvelopeError` naming the first bad field, never its value.
    """
    if not isinstance(obj, dict):
        raise _invalid(f"envelope must be a JSON object, got {type(obj).__name__}")
    # Any: the values are checked by Envelope.__post_init__, which names the first bad one.
    operation: Any = obj.get("operation")
    subject_id: Any = obj.get("subject_id")
    request: Any = obj.get("request")
    return Envelope(
        message_id=obj["message_id"] if "message_id" in obj else new_message_id(),
        operation=operation,
        subject_id=subject_id,
        request=request,
        created_at=obj["created_at"] if "created_at" in obj else _now_iso(),
        correlation_id=obj.get("correlation_id"),
        schema_version=obj.get("schema_version", SCHEMA_VERSION),
    )


def encode(envelope: Envelope, *, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    data = orjson.dumps(envelope.to_dict())
    if len(data) > max_bytes:
        raise EnvelopeTooLarge(len(data), max_bytes)
    return data


def _header(headers: Iterable[tuple[str, bytes]] | None, name: str) -> bytes | None:
    if not headers:
        return None
    found: bytes | None = None
    for key, value in headers:
        if key == name:
            if found is not None and value != found:
                raise _invalid(f"header {name} appears more than once with different values")
            found = value
    return found


def load_json(data: bytes, what: str) -> Any:
    """``orjson.loads`` with :class:`EnvelopeError` reasons (``invalid_encoding`` before ``invalid_json``);
    ``what`` names the input in the detail, which never quotes the data."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            raise EnvelopeError("invalid_encoding", f"{what} is not valid UTF-8") from None
        # orjson's message gives line/column only, never the document text.
        raise EnvelopeError("invalid_json", f"{what} is not valid JSON ({exc})") from None


def decode(
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]] | None = None,
    *,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> Envelope:
    """Parse and validate one Kafka record value; raise :class:`EnvelopeError` with a reason code."""
    if value is None or len(value) == 0:
        raise EnvelopeError("invalid_json", "message value is empty")
    if len(value) > max_bytes:
        raise EnvelopeTooLarge(len(value), max_bytes)
    obj = load_json(value, "message value")
    if not isinstance(obj, dict):
        raise _invalid(f"envelope must be a JSON object, got {type(obj).__name__}")
    validate_fields(obj)
    if _may_hold_big_int(obj.get("request")) and _has_big_int(value):
        raise _invalid(_BIG_INT)
    header_id = _header(headers, HEADER_MESSAGE_ID)
    if header_id is not None and header_id.decode("utf-8", "replace") != obj["message_id"]:
        raise _invalid(f"header {HEADER_MESSAGE_ID} does not match the envelope's message_id")
    # Already validated above: build without running __post_init__ a second time (hot path).
    env = object.__new__(Envelope)
    for name in ("message_id", "operation", "subject_id", "request", "created_at", "schema_version"):
        object.__setattr__(env, name, obj[name])
    object.__setattr__(env, "correlation_id", obj.get("correlation_id"))
    return env
