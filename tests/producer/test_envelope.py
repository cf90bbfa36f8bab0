"""The wire contract: every validation reason and message, limits, headers, round trips."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from producer.envelope import (
    HEADER_MESSAGE_ID,
    HEADER_OPERATION,
    HEADER_SCHEMA_VERSION,
    MAX_CORRELATION_LENGTH,
    MAX_ID_LENGTH,
    MAX_MESSAGE_BYTES,
    MAX_SUBJECT_LENGTH,
    OPERATIONS,
    SCHEMA_VERSION,
    Envelope,
    Operation,
    decode,
    encode,
    envelope_from_dict,
    get_operation,
    register_operation,
)
from producer.errors import EnvelopeError, EnvelopeTooLarge, UnknownOperation, VerificationError

# Looks like personal data; no error message may ever contain it.
SECRET = "Jane-Secret-Doe-1980"


def valid_obj(**changes: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "schema_version": 1,
        "message_id": "01936f0e-0000-7000-8000-000000000001",
        "operation": "aml_screening",
        "subject_id": "applicant-42",
        "correlation_id": "checkout-9",
        "created_at": "2026-11-28T22:00:00.123Z",
        "request": {"full_name": "Sample Person", "date_of_birth": "1990-01-01"},
    }
    obj.update(changes)
    return obj


def without(name: str) -> dict[str, Any]:
    obj = valid_obj()
    del obj[name]
    return obj


def raw(obj: object) -> bytes:
    return orjson.dumps(obj)


def decode_error(value: bytes | None, headers: list[tuple[str, bytes]] | None = None) -> EnvelopeError:
    with pytest.raises(EnvelopeError) as info:
        decode(value, headers)
    return info.value


def make(**changes: Any) -> Envelope:
    fields: dict[str, Any] = {
        "message_id": "m-1",
        "operation": "aml_screening",
        "subject_id": "applicant-42",
        "request": {"full_name": "Sample Person"},
    }
    fields.update(changes)
    return Envelope(**fields)


# --------------------------------------------------------------------------------------- round trip


def test_round_trip_keeps_every_field() -> None:
    env = make(correlation_id="checkout-9", created_at="2026-11-28T22:00:00.123Z")
    back = decode(encode(env), env.headers())
    assert back == env
    assert back.to_dict() == env.to_dict()


def test_round_trip_without_correlation_id_omits_the_field() -> None:
    env = make()
    assert "correlation_id" not in orjson.loads(encode(env))
    back = decode(encode(env))
    assert back.correlation_id is None
    assert back == env


def test_encoded_value_is_the_documented_json_object() -> None:
    env = make(correlation_id="c-1", created_at="2026-11-28T22:00:00.123Z")
    assert orjson.loads(encode(env)) == {
        "schema_version": SCHEMA_VERSION,
        "message_id": "m-1",
        "operation": "aml_screening",
        "subject_id": "applicant-42",
        "correlation_id": "c-1",
        "created_at": "2026-11-28T22:00:00.123Z",
        "request": {"full_name": "Sample Person"},
    }


def test_created_at_defaults_to_utc_now_in_milliseconds() -> None:
    created = make().created_at
    assert created.endswith("Z")
    assert len(created) == len("2026-11-28T22:00:00.123Z")


def test_key_is_the_subject_id_in_utf8() -> None:
    assert make(subject_id="applicant-42").key == b"applicant-42"


def test_headers_carry_message_id_operation_and_schema_version() -> None:
    assert make().headers() == [
        (HEADER_MESSAGE_ID, b"m-1"),
        (HEADER_OPERATION, b"aml_screening"),
        (HEADER_SCHEMA_VERSION, b"1"),
    ]


def test_unknown_top_level_fields_are_ignored() -> None:
    env = decode(raw(valid_obj(added_by_a_newer_producer={"x": 1}, priority=3)))
    assert env.message_id == valid_obj()["message_id"]
    assert "priority" not in env.to_dict()


json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(
    extra=st.dictionaries(st.text(max_size=10), json_values, max_size=5),
    full_name=st.text(min_size=1, max_size=40),
    subject=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,40}", fullmatch=True),
)
def test_any_json_request_survives_the_round_trip(
    extra: dict[str, Any], full_name: str, subject: str
) -> None:
    env = make(subject_id=subject, request={**extra, "full_name": full_name})
    assert decode(encode(env), env.headers()) == env


# ------------------------------------------------------------------------------------- value level


@pytest.mark.parametrize("value", [None, b""])
def test_empty_value_is_invalid_json(value: bytes | None) -> None:
    err = decode_error(value)
    assert (err.reason, str(err)) == ("invalid_json", "message value is empty")


def test_invalid_utf8_is_invalid_encoding() -> None:
    err = decode_error(b'{"message_id": "\xff\xfe"}')
    assert (err.reason, str(err)) == ("invalid_encoding", "message value is not valid UTF-8")


def test_not_json_is_invalid_json_without_the_document() -> None:
    err = decode_error(b'{"full_name": "' + SECRET.encode() + b'"')
    assert err.reason == "invalid_json"
    assert str(err).startswith("message value is not valid JSON (")
    assert SECRET not in str(err)


@pytest.mark.parametrize(
    ("value", "type_name"),
    [(b"[1, 2]", "list"), (b"42", "int"), (b"4.5", "float"), (b'"text"', "str"), (b"null", "NoneType")],
)
def test_json_that_is_not_an_object_is_invalid_envelope(value: bytes, type_name: str) -> None:
    err = decode_error(value)
    assert (err.reason, str(err)) == ("invalid_envelope", f"envelope must be a JSON object, got {type_name}")


def test_value_over_the_limit_is_too_large_before_parsing() -> None:
    with pytest.raises(EnvelopeTooLarge) as info:
        decode(b"x" * 101, max_bytes=100)
    err = info.value
    assert (err.reason, err.size, err.limit) == ("too_large", 101, 100)
    assert str(err) == "encoded message is 101 bytes, limit is 100"


def test_encode_enforces_the_limit() -> None:
    env = make(request={"full_name": "x" * 200})
    size = len(encode(env))
    assert len(encode(env, max_bytes=size)) == size
    with pytest.raises(EnvelopeTooLarge) as info:
        encode(env, max_bytes=size - 1)
    assert (info.value.size, info.value.limit) == (size, size - 1)


def test_default_limit_is_one_mebibyte() -> None:
    assert MAX_MESSAGE_BYTES == 1024 * 1024
    with pytest.raises(EnvelopeTooLarge):
        encode(make(request={"full_name": "x" * MAX_MESSAGE_BYTES}))


# ------------------------------------------------------------------------------------- field level


@pytest.mark.parametrize(
    ("obj", "reason", "message"),
    [
        # schema_version
        (without("schema_version"), "invalid_envelope", "schema_version must be an integer"),
        (valid_obj(schema_version="1"), "invalid_envelope", "schema_version must be an integer"),
        (valid_obj(schema_version=True), "invalid_envelope", "schema_version must be an integer"),
        (valid_obj(schema_version=1.0), "invalid_envelope", "schema_version must be an integer"),
        (
            valid_obj(schema_version=2),
            "invalid_envelope",
            "unsupported schema_version 2, this build reads 1",
        ),
        (
            valid_obj(schema_version=0),
            "invalid_envelope",
            "unsupported schema_version 0, this build reads 1",
        ),
        # message_id
        (without("message_id"), "missing_message_id", "message_id is missing or empty"),
        (valid_obj(message_id=None), "missing_message_id", "message_id is missing or empty"),
        (valid_obj(message_id=""), "missing_message_id", "message_id is missing or empty"),
        (valid_obj(message_id=12), "invalid_envelope", "message_id must be a string, got int"),
        (
            valid_obj(message_id="a" * (MAX_ID_LENGTH + 1)),
            "invalid_envelope",
            f"message_id is {MAX_ID_LENGTH + 1} characters, limit is {MAX_ID_LENGTH}",
        ),
        (
            valid_obj(message_id="has space"),
            "invalid_envelope",
            "message_id has characters outside [A-Za-z0-9._:@/+=-] or starts with a symbol",
        ),
        (
            valid_obj(message_id="-leading-symbol"),
            "invalid_envelope",
            "message_id has characters outside [A-Za-z0-9._:@/+=-] or starts with a symbol",
        ),
        (
            valid_obj(message_id="ünïcode"),
            "invalid_envelope",
            "message_id has characters outside [A-Za-z0-9._:@/+=-] or starts with a symbol",
        ),
        # operation
        (without("operation"), "invalid_envelope", "operation must be a non-empty string"),
        (valid_obj(operation=""), "invalid_envelope", "operation must be a non-empty string"),
        (valid_obj(operation=["aml_screening"]), "invalid_envelope", "operation must be a non-empty string"),
        (valid_obj(operation="credit_check"), "unknown_operation", "unknown operation 'credit_check'"),
        # subject_id
        (without("subject_id"), "invalid_envelope", "subject_id is missing or empty"),
        (valid_obj(subject_id=""), "invalid_envelope", "subject_id is missing or empty"),
        (valid_obj(subject_id=42), "invalid_envelope", "subject_id must be a string, got int"),
        (
            valid_obj(subject_id="s" * (MAX_SUBJECT_LENGTH + 1)),
            "invalid_envelope",
            f"subject_id is {MAX_SUBJECT_LENGTH + 1} characters, limit is {MAX_SUBJECT_LENGTH}",
        ),
        (
            valid_obj(subject_id=SECRET.replace("-", " ")),
            "invalid_envelope",
            "subject_id has characters outside [A-Za-z0-9._:@/+=-] or starts with a symbol",
        ),
        # correlation_id
        (
            valid_obj(correlation_id=7),
            "invalid_envelope",
            f"correlation_id must be a string of at most {MAX_CORRELATION_LENGTH} characters",
        ),
        (
            valid_obj(correlation_id="c" * (MAX_CORRELATION_LENGTH + 1)),
            "invalid_envelope",
            f"correlation_id must be a string of at most {MAX_CORRELATION_LENGTH} characters",
        ),
        # created_at
        (without("created_at"), "invalid_envelope", "created_at must be an ISO 8601 timestamp string"),
        (
            valid_obj(created_at=1764367200),
            "invalid_envelope",
            "created_at must be an ISO 8601 timestamp string",
        ),
        (
            valid_obj(created_at="2026-11-28T22:00:00Z" + " " * 60),
            "invalid_envelope",
            "created_at must be an ISO 8601 timestamp string",
        ),
        (valid_obj(created_at="yesterday"), "invalid_envelope", "created_at is not an ISO 8601 timestamp"),
        (
            valid_obj(created_at="2026-11-28T22:00:00"),
            "invalid_envelope",
            "created_at must carry a UTC offset",
        ),
        # request
        (without("request"), "invalid_envelope", "request must be a JSON object"),
        (valid_obj(request=[SECRET]), "invalid_envelope", "request must be a JSON object"),
        (valid_obj(request=SECRET), "invalid_envelope", "request must be a JSON object"),
        (
            valid_obj(request={"date_of_birth": "1990-01-01"}),
            "invalid_envelope",
            "request.full_name is required for aml_screening and must be a non-empty string",
        ),
        (
            valid_obj(request={"full_name": ""}),
            "invalid_envelope",
            "request.full_name is required for aml_screening and must be a non-empty string",
        ),
        (
            valid_obj(request={"full_name": ["Jane", "Doe"]}),
            "invalid_envelope",
            "request.full_name is required for aml_screening and must be a non-empty string",
        ),
        (
            valid_obj(operation="create_session", request={"vendor_data": SECRET}),
            "invalid_envelope",
            "request.workflow_id is required for create_session and must be a non-empty string",
        ),
        (
            valid_obj(operation="id_verification", request={"document_type": "passport"}),
            "invalid_envelope",
            'request.front_image is required for id_verification: a document reference {"document": "<uri>"} '
            "or a base64 string of at most 65536 characters",
        ),
        (
            valid_obj(
                operation="id_verification", request={"document_type": "x", "front_image": SECRET * 5000}
            ),
            "invalid_envelope",
            f"request.front_image is an inline image of {len(SECRET) * 5000} characters, limit is 65536: put "
            'the image in a document source and send {"document": "<uri>"} instead (docs/documents.md)',
        ),
        (
            valid_obj(
                operation="id_verification",
                request={"document_type": "x", "front_image": {"document": SECRET + " x"}},
            ),
            "invalid_envelope",
            "request.front_image.document must be a URI (scheme:rest, e.g. local:<path> or https://…; "
            "printable ASCII, at most 2048 characters)",
        ),
        (
            valid_obj(
                operation="id_verification",
                request={"document_type": "x", "front_image": {"document": "local:a", SECRET: 1}},
            ),
            "invalid_envelope",
            'request.front_image is an object but not a document reference {"document": "<uri>"}',
        ),
        (
            valid_obj(operation="id_verification", request={"document_type": "x", "front_image": [SECRET]}),
            "invalid_envelope",
            'request.front_image must be a document reference {"document": "<uri>"} or a base64 string of at '
            "most 65536 characters, got list",
        ),
        (
            valid_obj(operation="id_verification", request={"front_image": SECRET}),
            "invalid_envelope",
            "request.document_type is required for id_verification and must be a non-empty string",
        ),
    ],
)
def test_each_invalid_field_has_a_reason_and_a_message(
    obj: dict[str, Any], reason: str, message: str
) -> None:
    err = decode_error(raw(obj))
    assert (err.reason, err.detail, str(err)) == (reason, message, message)
    assert isinstance(err, VerificationError)
    assert isinstance(err, ValueError)
    assert not err.retriable
    assert SECRET not in str(err)
    assert SECRET.replace("-", " ") not in str(err)


def test_unknown_operation_is_its_own_class_and_truncates_long_names() -> None:
    err = decode_error(raw(valid_obj(operation="x" * 100)))
    assert isinstance(err, UnknownOperation)
    assert err.operation == "x" * 100
    assert str(err) == f"unknown operation '{'x' * 64}...'"


@pytest.mark.parametrize(
    "changes",
    [
        {"message_id": "a" * MAX_ID_LENGTH},
        {"message_id": str(uuid.uuid4())},
        {"message_id": "01HZX3K7Q9ZV8T1M2N3P4R5S6T"},
        {"message_id": "order:42/attempt@1+x=y_z.w-v"},
        {"subject_id": "s" * MAX_SUBJECT_LENGTH},
        {"correlation_id": "c" * MAX_CORRELATION_LENGTH},
        {"correlation_id": None},
        {"correlation_id": "free text, any characters: ü !"},
        {"created_at": "2026-11-28T22:00:00+02:00"},
        {"created_at": "2026-11-28T22:00:00.123456+00:00"},
        {"request": {"full_name": "x", "nested": {"list": [1, 2.5, None, True]}}},
    ],
)
def test_values_at_and_inside_the_limits_are_accepted(changes: dict[str, Any]) -> None:
    env = decode(raw(valid_obj(**changes)))
    for name, value in changes.items():
        assert getattr(env, name) == value


def test_every_registered_operation_accepts_its_required_fields() -> None:
    for name, operation in OPERATIONS.items():
        request = dict.fromkeys(operation.required, "value")
        assert decode(raw(valid_obj(operation=name, request=request))).operation == name


def test_envelope_constructor_validates_too() -> None:
    with pytest.raises(EnvelopeError) as info:
        make(subject_id="")
    assert info.value.detail == "subject_id is missing or empty"
    with pytest.raises(UnknownOperation):
        make(operation="nope")


# ------------------------------------------------------------------------------------------ headers


def test_matching_message_id_header_is_accepted() -> None:
    env = make()
    assert decode(encode(env), [(HEADER_MESSAGE_ID, b"m-1"), ("unrelated", b"x")]) == env


def test_message_id_header_mismatch_is_rejected() -> None:
    err = decode_error(encode(make()), [(HEADER_MESSAGE_ID, b"m-2")])
    assert (err.reason, str(err)) == (
        "invalid_envelope",
        "header idv-message-id does not match the envelope's message_id",
    )


def test_repeated_header_with_different_values_is_rejected() -> None:
    err = decode_error(encode(make()), [(HEADER_MESSAGE_ID, b"m-1"), (HEADER_MESSAGE_ID, b"m-2")])
    assert (err.reason, str(err)) == (
        "invalid_envelope",
        "header idv-message-id appears more than once with different values",
    )


def test_repeated_header_with_the_same_value_is_accepted() -> None:
    env = make()
    assert decode(encode(env), [(HEADER_MESSAGE_ID, b"m-1"), (HEADER_MESSAGE_ID, b"m-1")]) == env


def test_non_utf8_message_id_header_is_a_mismatch() -> None:
    err = decode_error(encode(make()), [(HEADER_MESSAGE_ID, b"\xff")])
    assert err.detail == "header idv-message-id does not match the envelope's message_id"


@pytest.mark.parametrize("headers", [None, []])
def test_header_is_optional(headers: list[tuple[str, bytes]] | None) -> None:
    assert decode(encode(make()), headers).message_id == "m-1"


# ---------------------------------------------------------------------------------------- registry


def test_get_operation_returns_the_registered_operation() -> None:
    op = get_operation("create_session")
    assert (op.path, op.required, op.reference_field) == ("/v3/session/", ("workflow_id",), "session_id")
    with pytest.raises(UnknownOperation):
        get_operation("nope")


def test_register_operation_extends_the_registry() -> None:
    op = Operation("age_estimation", "/v3/age/", ("selfie",))
    try:
        assert register_operation(op) is op
        env = decode(raw(valid_obj(operation="age_estimation", request={"selfie": "img"})))
        assert env.operation == "age_estimation"
    finally:
        OPERATIONS.pop("age_estimation", None)


@pytest.mark.parametrize(
    ("operation", "message"),
    [
        (Operation("bad name", "/x/"), "invalid operation name 'bad name'"),
        (Operation("fine", "no-slash"), "operation path must start with '/'"),
    ],
)
def test_register_operation_rejects_bad_definitions(operation: Operation, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        register_operation(operation)
    assert operation.name not in OPERATIONS


# ------------------------------------------------------------------------------- envelope_from_dict


def test_from_dict_generates_a_uuid7_message_id_and_created_at_when_absent() -> None:
    env = envelope_from_dict(
        {"operation": "aml_screening", "subject_id": "s-1", "request": {"full_name": "x"}}
    )
    assert uuid.UUID(env.message_id).version == 7
    assert env.created_at.endswith("Z")
    assert env.schema_version == SCHEMA_VERSION
    assert env.correlation_id is None


def test_from_dict_keeps_given_fields_and_ignores_unknown_ones() -> None:
    obj = valid_obj(unknown="ignored")
    env = envelope_from_dict(obj)
    assert env.to_dict() == {k: v for k, v in obj.items() if k != "unknown"}


@pytest.mark.parametrize(
    ("obj", "reason", "message"),
    [
        ([1], "invalid_envelope", "envelope must be a JSON object, got list"),
        ("text", "invalid_envelope", "envelope must be a JSON object, got str"),
        (valid_obj(message_id=None), "missing_message_id", "message_id is missing or empty"),
        (valid_obj(message_id=""), "missing_message_id", "message_id is missing or empty"),
        (without("operation"), "invalid_envelope", "operation must be a non-empty string"),
        (without("subject_id"), "invalid_envelope", "subject_id is missing or empty"),
        (without("request"), "invalid_envelope", "request must be a JSON object"),
        (valid_obj(schema_version=2), "invalid_envelope", "unsupported schema_version 2, this build reads 1"),
        (valid_obj(created_at="soon"), "invalid_envelope", "created_at is not an ISO 8601 timestamp"),
    ],
)
def test_from_dict_errors_name_the_field(obj: object, reason: str, message: str) -> None:
    with pytest.raises(EnvelopeError) as info:
        envelope_from_dict(obj)
    assert (info.value.reason, str(info.value)) == (reason, message)


# -- integers beyond 64 bits (orjson would decode them as rounded floats) -------------------------------


@pytest.mark.parametrize(
    "literal", [b"123456789012345678901234567890", b"18446744073709551616", b"-9223372036854775809"]
)
def test_decode_rejects_an_integer_beyond_64_bits(literal: bytes) -> None:
    value = orjson.dumps(valid_obj(request={"full_name": "X", "n": 0})).replace(b'"n":0', b'"n":' + literal)
    with pytest.raises(EnvelopeError) as info:
        decode(value)
    assert info.value.reason == "invalid_envelope"
    assert "64 bits" in info.value.detail


def test_two_requests_differing_only_beyond_64_bits_are_not_both_accepted() -> None:
    base = orjson.dumps(valid_obj(request={"full_name": "X", "n": 0}))
    a = base.replace(b'"n":0', b'"n":123456789012345678901234567890')
    b = base.replace(b'"n":0', b'"n":123456789012345678901234567891')
    assert orjson.loads(a) == orjson.loads(b)  # what orjson alone makes of them: the same float
    for value in (a, b):
        with pytest.raises(EnvelopeError):
            decode(value)


@pytest.mark.parametrize(
    "literal",
    [
        b"18446744073709551615",
        b"-9223372036854775808",
        b"1.5e30",
        b"-2e40",
        b'"123456789012345678901234567890"',
    ],
)
def test_decode_keeps_64_bit_integers_large_floats_and_digit_strings(literal: bytes) -> None:
    value = orjson.dumps(valid_obj(request={"full_name": "X", "n": 0})).replace(b'"n":0', b'"n":' + literal)
    assert decode(value).request["n"] == orjson.loads(literal)


def test_encode_rejects_an_integer_beyond_64_bits() -> None:
    with pytest.raises(EnvelopeError) as info:
        Envelope(
            message_id="m-big",
            operation="aml_screening",
            subject_id="s",
            request={"full_name": "X", "n": 2**64},
        )
    assert info.value.reason == "invalid_envelope"
    assert "64 bits" in info.value.detail


def test_canonical_request_sorts_keys_at_every_level() -> None:
    from producer.envelope import canonical_request

    a = Envelope(
        message_id="m",
        operation="aml_screening",
        subject_id="s",
        request={"z": {"b": 1, "a": 2}, "full_name": "X"},
    )
    b = Envelope(
        message_id="m",
        operation="aml_screening",
        subject_id="s",
        request={"full_name": "X", "z": {"a": 2, "b": 1}},
    )
    assert canonical_request(a) == canonical_request(b) == b'{"full_name":"X","z":{"a":2,"b":1}}'


def test_producer_input_with_an_integer_beyond_64_bits_is_rejected_before_it_is_rounded() -> None:
    from producer.cli import parse_line

    line = orjson.dumps(valid_obj(request={"full_name": "X", "n": 0})).replace(
        b'"n":0', b'"n":123456789012345678901234567890'
    )
    with pytest.raises(EnvelopeError) as info:
        parse_line(line)
    assert info.value.reason == "invalid_envelope" and "64 bits" in info.value.detail
    assert parse_line(line.replace(b"123456789012345678901234567890", b"12")).request["n"] == 12


def test_image_fields_of_every_operation_take_document_references() -> None:
    """An image field (named ``*_image``) that only took strings would force images into Kafka messages:
    every operation declares its image fields in ``Operation.documents``, and a reference passes there."""
    for name, operation in OPERATIONS.items():
        images = {f for f in operation.required if f.endswith("_image")}
        assert images <= set(operation.documents), f"{name}: image fields not in Operation.documents"
        request: dict[str, Any] = dict.fromkeys(operation.required, "value")
        request.update({f: {"document": f"local:sha256/ab/{f}.jpg"} for f in operation.documents})
        assert decode(raw(valid_obj(operation=name, request=request))).request == request
