"""The published wire contract (producer/contract/) against the code that enforces it.

* every example in the envelope schema decodes with the real decoder;
* every rule of the decoder (every ``raise`` site in producer/envelope.py) has a counterexample that the
  decoder rejects with the expected reason **and** the schema rejects — except the rules a JSON Schema
  cannot express, which are listed in :data:`SCHEMA_GAPS` (and in the schema's own description): for
  those the test shows the gap is real (the schema accepts, or cannot even apply to, the bad value);
* the AsyncAPI document names exactly the headers, fields, reasons and topics the code uses.

Patterns in the schema are ECMA-262, as JSON Schema specifies. Python's ``jsonschema`` evaluates them with
``re.search``, where ``$`` also matches before a final newline; :func:`_ecma_pattern` restores the
ECMA-262 meaning of a trailing ``$`` so an ID ending in ``\\n`` is judged as a Go/Java/Node validator
would judge it.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
import yaml
from aiokafka.structs import ConsumerRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft7Validator, ValidationError, validators  # the `test` extra; never skipped

import producer.envelope as envelope_module
import producer.errors as errors_module
from consumer import sinks
from consumer.settings import Settings
from consumer.sinks import results
from consumer.store.base import Outcome, Record, State
from producer.contract import (
    CONTRACT_FILES,
    asyncapi_text,
    contract_file,
    envelope_schema,
    result_schema,
)
from producer.envelope import (
    HEADER_MESSAGE_ID,
    HEADER_OPERATION,
    HEADER_SCHEMA_VERSION,
    MAX_CORRELATION_LENGTH,
    MAX_DOCUMENT_URI_LENGTH,
    MAX_ID_LENGTH,
    MAX_INLINE_IMAGE_CHARS,
    MAX_MESSAGE_BYTES,
    MAX_SUBJECT_LENGTH,
    OPERATIONS,
    SCHEMA_VERSION,
    decode,
)
from producer.errors import EnvelopeError

CONTRACT_DIR = Path(envelope_module.__file__).parent / "contract"


def _ecma(pattern: str) -> str:
    # ECMA-262 (non-multiline): a trailing `$` matches only at the very end; Python's `\Z` does that.
    return re.sub(r"(?<!\\)\$$", r"\\Z", pattern)


def _ecma_pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not re.search(_ecma(pattern), instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


EcmaDraft7 = validators.extend(Draft7Validator, {"pattern": _ecma_pattern})


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    s = envelope_schema()
    Draft7Validator.check_schema(s)
    return s


def schema_accepts(schema: Mapping[str, Any], obj: object) -> bool:
    return bool(EcmaDraft7(schema).is_valid(obj))


def good(**overrides: Any) -> dict[str, Any]:
    env: dict[str, Any] = {
        "schema_version": 1,
        "message_id": "msg-1",
        "operation": "aml_screening",
        "subject_id": "applicant-1",
        "created_at": "2026-11-28T22:00:00Z",
        "request": {"full_name": "Jane Roe"},
    }
    for name, value in overrides.items():
        if value is _ABSENT:
            env.pop(name, None)
        else:
            env[name] = value
    return env


_ABSENT = object()


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@dataclass
class Case:
    """A record the decoder must reject with ``reason``."""

    name: str
    reason: str
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    max_bytes: int = MAX_MESSAGE_BYTES


def case(name: str, reason: str, obj: object, headers: list[tuple[str, bytes]] | None = None) -> Case:
    return Case(name, reason, orjson.dumps(obj), headers or [])


# Counterexamples the schema rejects too.
EXPRESSIBLE = [
    case("value is an array", "invalid_envelope", [1, 2]),
    case("value is null", "invalid_envelope", None),
    case("value is a string", "invalid_envelope", "msg-1"),
    case("schema_version missing", "invalid_envelope", good(schema_version=_ABSENT)),
    case("schema_version as a string", "invalid_envelope", good(schema_version="1")),
    case("schema_version true", "invalid_envelope", good(schema_version=True)),
    case("schema_version 2", "invalid_envelope", good(schema_version=2)),
    case("message_id missing", "missing_message_id", good(message_id=_ABSENT)),
    case("message_id null", "missing_message_id", good(message_id=None)),
    case("message_id empty", "missing_message_id", good(message_id="")),
    case("message_id a number", "invalid_envelope", good(message_id=42)),
    case("message_id 129 characters", "invalid_envelope", good(message_id="m" * (MAX_ID_LENGTH + 1))),
    case("message_id starts with a symbol", "invalid_envelope", good(message_id="-abc")),
    case("message_id with a space", "invalid_envelope", good(message_id="a b")),
    case("message_id with a trailing newline", "invalid_envelope", good(message_id="abc\n")),
    case("message_id non-ASCII", "invalid_envelope", good(message_id="caf\u00e9")),
    case("operation missing", "invalid_envelope", good(operation=_ABSENT)),
    case("operation a number", "invalid_envelope", good(operation=7)),
    case("operation empty", "invalid_envelope", good(operation="")),
    case("operation not registered", "unknown_operation", good(operation="delete_everything")),
    case("subject_id missing", "invalid_envelope", good(subject_id=_ABSENT)),
    case("subject_id empty", "invalid_envelope", good(subject_id="")),
    case("subject_id a list", "invalid_envelope", good(subject_id=["a"])),
    case("subject_id 257 characters", "invalid_envelope", good(subject_id="s" * (MAX_SUBJECT_LENGTH + 1))),
    case("subject_id with a slash first", "invalid_envelope", good(subject_id="/a")),
    case("correlation_id a number", "invalid_envelope", good(correlation_id=5)),
    case(
        "correlation_id 257 characters",
        "invalid_envelope",
        good(correlation_id="c" * (MAX_CORRELATION_LENGTH + 1)),
    ),
    case("created_at missing", "invalid_envelope", good(created_at=_ABSENT)),
    case("created_at a number", "invalid_envelope", good(created_at=1764367200)),
    case("created_at 65 characters", "invalid_envelope", good(created_at="2026-11-28T22:00:00" + "0" * 46)),
    case("created_at not a timestamp", "invalid_envelope", good(created_at="yesterday")),
    case("created_at without offset", "invalid_envelope", good(created_at="2026-11-28T22:00:00")),
    case("request missing", "invalid_envelope", good(request=_ABSENT)),
    case("request an array", "invalid_envelope", good(request=[{"full_name": "x"}])),
    case("request a string", "invalid_envelope", good(request="full_name=x")),
    case("aml_screening without full_name", "invalid_envelope", good(request={"name": "Jane"})),
    case("aml_screening full_name empty", "invalid_envelope", good(request={"full_name": ""})),
    case("aml_screening full_name a number", "invalid_envelope", good(request={"full_name": 5})),
    case(
        "create_session without workflow_id",
        "invalid_envelope",
        good(operation="create_session", request={"vendor_data": "x"}),
    ),
    case(
        "id_verification without front_image",
        "invalid_envelope",
        good(operation="id_verification", request={"document_type": "passport"}),
    ),
    *(
        case(f"id_verification {name}", "invalid_envelope", good(operation="id_verification", request=req))
        for name, req in (
            ("front_image empty", {"document_type": "passport", "front_image": ""}),
            ("front_image null", {"document_type": "passport", "front_image": None}),
            ("front_image a number", {"document_type": "passport", "front_image": 5}),
            (
                "inline front_image over the limit",
                {"document_type": "passport", "front_image": "A" * (MAX_INLINE_IMAGE_CHARS + 1)},
            ),
            (
                "inline back_image over the limit",
                {
                    "document_type": "passport",
                    "front_image": "aGk=",
                    "back_image": "A" * (MAX_INLINE_IMAGE_CHARS + 1),
                },
            ),
            (
                "reference with another key",
                {"document_type": "passport", "front_image": {"document": "local:a.jpg", "size": 5}},
            ),
            (
                "reference without document",
                {"document_type": "passport", "front_image": {"uri": "local:a.jpg"}},
            ),
            ("reference URI a number", {"document_type": "passport", "front_image": {"document": 5}}),
            ("reference URI empty", {"document_type": "passport", "front_image": {"document": ""}}),
            (
                "reference URI without scheme",
                {"document_type": "passport", "front_image": {"document": "a.jpg"}},
            ),
            (
                "reference URI with a space",
                {"document_type": "passport", "front_image": {"document": "local:a b"}},
            ),
            (
                "reference URI non-ASCII",
                {"document_type": "passport", "front_image": {"document": "local:\u00e9"}},
            ),
            (
                "reference URI too long",
                {
                    "document_type": "passport",
                    "front_image": {"document": "local:" + "a" * MAX_DOCUMENT_URI_LENGTH},
                },
            ),
        )
    ),
]

# Rules a JSON Schema cannot express; the schema's description lists them with these numbers.
# name -> (the rule, a word the schema description must contain about it)
SCHEMA_GAPS: dict[str, tuple[str, str]] = {
    "size": (
        "(1) value at most IDV_MAX_MESSAGE_BYTES bytes: a schema sees parsed values, not bytes",
        "too_large",
    ),
    "utf8": ("(2) value is UTF-8: undecodable bytes never become a JSON instance", "invalid_encoding"),
    "json": ("(3) one JSON text, not empty, nesting <= 1024: syntax is below the schema", "invalid_json"),
    "reencode": ("(4) the request re-encodes (nesting < ~250): JSON Schema has no depth limit", "re-encodes"),
    "integer": ("(5) schema_version written as 1, not 1.0: JSON Schema equates 1.0 with 1", "1.0"),
    "calendar": ("(6) created_at is a real date/time: a pattern checks the shape only", "calendar"),
    "header": (
        "(7) the idv-message-id header agrees with the body: headers are not in the value",
        HEADER_MESSAGE_ID,
    ),
    "bigint": (
        "(8) every integer in the request fits in 64 bits: no bound covers a free-form request",
        "64 bits",
    ),
}

OVERSIZED = orjson.dumps(good(padding="x" * MAX_MESSAGE_BYTES))
# (gap, case, the parsed value the schema would see, or None when there is none)
GAP_CASES: list[tuple[str, Case, object]] = [
    ("size", Case("value over the byte limit", "too_large", OVERSIZED), orjson.loads(OVERSIZED)),
    (
        "size",
        Case("limit lowered (IDV_MAX_MESSAGE_BYTES)", "too_large", orjson.dumps(good()), max_bytes=64),
        good(),
    ),
    (
        "bigint",
        Case(
            "integer beyond 64 bits in the request",
            "invalid_envelope",
            orjson.dumps(good(request={"full_name": "x", "n": 1})).replace(b'"n":1', b'"n":' + b"9" * 30),
        ),
        good(request={"full_name": "x", "n": int("9" * 30)}),
    ),
    ("utf8", Case("Latin-1 bytes", "invalid_encoding", '{"message_id": "caf\u00e9"'.encode("latin-1")), None),
    ("utf8", Case("binary", "invalid_encoding", b"\xff\xfe\x00\x01"), None),
    ("json", Case("empty value", "invalid_json", b""), None),
    ("json", Case("null value (a tombstone)", "invalid_json", None), None),
    ("json", Case("not JSON", "invalid_json", b"{message_id: 1}"), None),
    ("json", Case("trailing garbage", "invalid_json", orjson.dumps(good()) + b"}"), None),
    (
        "json",
        Case(
            "nested deeper than 1024",
            "invalid_json",
            orjson.dumps(good()).replace(b'"Jane Roe"', b"[" * 1100 + b"]" * 1100),
        ),
        None,
    ),
    (
        "reencode",
        # orjson cannot write this; the stdlib can (and a producer in another language could).
        Case(
            "request nested 300 deep",
            "invalid_envelope",
            json.dumps(good(request={"full_name": "x", "deep": nested(300)})).encode(),
        ),
        good(request={"full_name": "x", "deep": nested(300)}),
    ),
    (
        "integer",
        Case(
            "schema_version 1.0",
            "invalid_envelope",
            orjson.dumps(good()).replace(b'"schema_version":1', b'"schema_version":1.0'),
        ),
        good(),
    ),
    (
        "calendar",
        case("created_at 30 February", "invalid_envelope", good(created_at="2026-02-30T00:00:00Z")),
        good(created_at="2026-02-30T00:00:00Z"),
    ),
    (
        "calendar",
        case("created_at hour 24", "invalid_envelope", good(created_at="2026-11-28T24:00:00Z")),
        good(created_at="2026-11-28T24:00:00Z"),
    ),
    (
        "header",
        case("header disagrees with body", "invalid_envelope", good(), [(HEADER_MESSAGE_ID, b"other")]),
        good(),
    ),
    (
        "header",
        case(
            "header twice, different values",
            "invalid_envelope",
            good(),
            [(HEADER_MESSAGE_ID, b"msg-1"), (HEADER_MESSAGE_ID, b"msg-2")],
        ),
        good(),
    ),
]


def rejection(c: Case) -> EnvelopeError:
    with pytest.raises(EnvelopeError) as info:
        decode(c.value, c.headers, max_bytes=c.max_bytes)
    return info.value


# -- examples ------------------------------------------------------------------------------------------


def test_every_schema_example_is_valid_and_decodes(schema: dict[str, Any]) -> None:
    examples = schema["examples"]
    assert {e["operation"] for e in examples} == set(OPERATIONS), "one example per operation at least"
    for example in examples:
        EcmaDraft7(schema).validate(example)
        Draft7Validator(schema).validate(example)  # and with the plain validator
        env = decode(orjson.dumps(example), [(HEADER_MESSAGE_ID, example["message_id"].encode())])
        for name in ("schema_version", "message_id", "operation", "subject_id", "created_at", "request"):
            assert getattr(env, name) == example[name]
        assert env.correlation_id == example.get("correlation_id")


def test_result_schema_examples_and_the_real_event(schema: dict[str, Any]) -> None:
    rs = result_schema()
    Draft7Validator.check_schema(rs)
    for example in rs["examples"]:
        EcmaDraft7(rs).validate(example)
    for outcome, state in (
        (Outcome("approved", 200, "ref-1"), State.COMPLETED),
        (Outcome("failed", 422, None, "validation_error"), State.FAILED),
        (None, State.FAILED),
    ):
        record = Record(
            key="idv_" + "0" * 32,
            message_id="msg-1",
            operation="aml_screening",
            fingerprint="h1:x",
            state=state,
            owner=None,
            lease_until=None,
            attempts=2,
            outcome=outcome,
            last_error=None,
            created_at=1764367200.0,
            updated_at=1764367201.5,
            expires_at=1766959200.0,
        )
        event = orjson.loads(sinks.result_event(record, "applicant-1"))
        EcmaDraft7(rs).validate(event)
        assert set(event) == set(rs["properties"]) == set(rs["required"])
    assert rs["properties"]["schema_version"]["const"] == sinks.RESULT_SCHEMA_VERSION


# -- the schema mirrors the decoder's constants --------------------------------------------------------


def test_schema_constants_match_the_decoder(schema: dict[str, Any]) -> None:
    props = schema["properties"]
    assert props["schema_version"]["const"] == SCHEMA_VERSION
    assert props["operation"]["enum"] == list(OPERATIONS)
    id_pattern = "^" + envelope_module._ID_RE.pattern + "$"
    for name, limit in (("id128", MAX_ID_LENGTH), ("id256", MAX_SUBJECT_LENGTH)):
        assert schema["definitions"][name]["pattern"] == id_pattern
        assert schema["definitions"][name]["maxLength"] == limit
    assert props["message_id"]["$ref"] == "#/definitions/id128"
    assert props["subject_id"]["$ref"] == "#/definitions/id256"
    assert props["correlation_id"]["maxLength"] == MAX_CORRELATION_LENGTH
    branches = {b["if"]["properties"]["operation"]["const"]: b["then"] for b in schema["allOf"]}
    assert set(branches) == set(OPERATIONS)
    for name, op in OPERATIONS.items():
        ref = branches[name]["properties"]["request"]["$ref"]
        assert ref == f"#/definitions/request_{name}"
        req = schema["definitions"][f"request_{name}"]
        assert tuple(req["required"]) == op.required
        assert op.path in req["description"]
    reference = schema["definitions"]["documentReference"]["properties"]["document"]
    assert reference["pattern"] == "^" + envelope_module._URI_RE.pattern + "$"
    assert reference["maxLength"] == MAX_DOCUMENT_URI_LENGTH
    inline = schema["definitions"]["image"]["oneOf"][1]
    assert inline["maxLength"] == MAX_INLINE_IMAGE_CHARS
    for name, op in OPERATIONS.items():
        properties = schema["definitions"][f"request_{name}"].get("properties", {})
        assert {f for f, p in properties.items() if p == {"$ref": "#/definitions/image"}} == set(op.documents)
    assert set(schema["required"]) == {
        "schema_version",
        "message_id",
        "operation",
        "subject_id",
        "created_at",
        "request",
    }


# -- counterexamples -----------------------------------------------------------------------------------


def decoder_reasons() -> set[str]:
    """Every reason code the decoder can raise, read from its source (not from a list kept by hand)."""
    source = inspect.getsource(envelope_module) + inspect.getsource(errors_module)
    found = set(re.findall(r'EnvelopeError\(\s*"(\w+)"', source))
    found |= set(re.findall(r'missing_reason="(\w+)"', source))
    found |= set(re.findall(r'super\(\).__init__\("(\w+)"', source))
    return found


def test_every_decoder_reason_has_a_counterexample() -> None:
    reasons = decoder_reasons()
    assert reasons == {
        "invalid_json",
        "invalid_encoding",
        "invalid_envelope",
        "missing_message_id",
        "unknown_operation",
        "too_large",
    }
    assert reasons <= set(sinks.DLQ_REASONS)
    covered = {c.reason for c in EXPRESSIBLE} | {c.reason for _, c, _ in GAP_CASES}
    assert covered == reasons


@pytest.mark.parametrize("c", EXPRESSIBLE, ids=lambda c: c.name)
def test_counterexample_rejected_by_decoder_and_schema(c: Case, schema: dict[str, Any]) -> None:
    assert rejection(c).reason == c.reason
    assert not schema_accepts(schema, orjson.loads(c.value or b"null")), f"schema accepts: {c.name}"


@pytest.mark.parametrize(("gap", "c", "parsed"), GAP_CASES, ids=[c.name for _, c, _ in GAP_CASES])
def test_listed_schema_gap(gap: str, c: Case, parsed: object, schema: dict[str, Any]) -> None:
    """The decoder rejects; the schema cannot (it accepts the parsed value, or there is none to judge).
    If the schema learns to reject one of these, move the case to EXPRESSIBLE."""
    assert rejection(c).reason == c.reason
    if parsed is not None:
        assert schema_accepts(schema, parsed), f"{c.name}: the schema now rejects it; move it to EXPRESSIBLE"
    else:
        assert c.value is None or c.value == b"" or not _parses(c.value)


def _parses(value: bytes) -> bool:
    try:
        orjson.loads(value)
    except orjson.JSONDecodeError:
        return False
    return True


def test_every_gap_is_stated_in_the_schema_description(schema: dict[str, Any]) -> None:
    description = schema["description"]
    for gap, (rule, word) in SCHEMA_GAPS.items():
        number = rule.split(")")[0] + ")"
        assert number in description and word in description, f"gap {gap} not described: {rule}"
    assert {g for g, _, _ in GAP_CASES} == set(SCHEMA_GAPS)


def _raise_sites() -> set[tuple[str, int, int]]:
    """(function, first line, last line) of every ``raise`` of the decoding path in producer/envelope.py."""
    path = envelope_module.__file__
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    wanted = {"decode", "validate_fields", "_check_id", "_check_document", "_header", "get_operation"}
    sites = set()
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef) and fn.name in wanted:
            for node in ast.walk(fn):
                if isinstance(node, ast.Raise):
                    sites.add((fn.name, node.lineno, node.end_lineno or node.lineno))
    return sites


ENCODE_ONLY: list[dict[str, Any]] = [good(request={"full_name": "x", "n": 2**70})]


def test_every_raise_site_of_the_decoder_is_hit_by_a_counterexample() -> None:
    """Not just every reason: every individual rule (each ``raise``) has a counterexample."""
    hit: set[int] = set()
    for c in [*EXPRESSIBLE, *(c for _, c, _ in GAP_CASES)]:
        tb = rejection(c).__traceback__
        line = 0
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == envelope_module.__file__:
                line = tb.tb_lineno
            tb = tb.tb_next
        hit.add(line)
    # Rules only a Python caller can reach (encode, or an Envelope built by hand): the decoder's own
    # parse can never produce a Python integer beyond 64 bits (orjson reads it as a float).
    for obj in ENCODE_ONLY:
        with pytest.raises(EnvelopeError) as info:
            envelope_module.validate_fields(obj)
        tb = info.value.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == envelope_module.__file__:
                line = tb.tb_lineno
            tb = tb.tb_next
        hit.add(line)
    missing = [s for s in _raise_sites() if not any(s[1] <= line <= s[2] for line in hit)]
    assert not missing, f"decoder rules without a counterexample: {missing}"


_ID_CHARS = st.text(alphabet=st.characters(codec="utf-8"), max_size=140) | st.text(
    alphabet="Aa0._:@/+=-\n ", max_size=140
)


@settings(max_examples=300, deadline=None)
@given(message_id=_ID_CHARS, subject_id=_ID_CHARS, correlation=st.none() | st.text(max_size=300))
def test_schema_and_decoder_agree_on_ids(message_id: str, subject_id: str, correlation: str | None) -> None:
    obj = good(message_id=message_id, subject_id=subject_id, correlation_id=correlation)
    try:
        decode(orjson.dumps(obj))
    except EnvelopeError:
        decoder_ok = False
    else:
        decoder_ok = True
    assert schema_accepts(envelope_schema(), obj) == decoder_ok


# -- the AsyncAPI document -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def asyncapi() -> dict[str, Any]:
    doc = yaml.safe_load(asyncapi_text())
    assert isinstance(doc, dict)
    return doc


def _refs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def _pointer(doc: Any, ref: str) -> Any:
    node = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_contract_files_ship_as_package_data() -> None:
    for name in CONTRACT_FILES:
        assert contract_file(name).is_file(), name
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text(encoding="utf-8")
    assert '"contract/*.json", "contract/*.yaml"' in pyproject


def test_asyncapi_is_version_3_and_every_ref_resolves(asyncapi: dict[str, Any]) -> None:
    assert asyncapi["asyncapi"].startswith("3.")
    for key in ("info", "channels", "operations", "components"):
        assert key in asyncapi
    assert orjson.loads(orjson.dumps(asyncapi)) == asyncapi  # JSON-compatible (no YAML-only types)
    for ref in _refs(asyncapi):
        if ref.startswith("#/"):
            _pointer(asyncapi, ref)
        else:
            assert (CONTRACT_DIR / ref).is_file(), ref
    for op in asyncapi["operations"].values():
        assert op["action"] in ("send", "receive")
        _pointer(asyncapi, op["channel"]["$ref"])
        for message in op["messages"]:
            assert message["$ref"].startswith(op["channel"]["$ref"] + "/messages/")


def test_asyncapi_topics_are_the_default_settings(asyncapi: dict[str, Any]) -> None:
    s = Settings(provider_api_key="x")
    channels = asyncapi["channels"]
    assert channels["requests"]["address"] == s.topics[0]
    assert channels["results"]["address"] == s.result_topic
    assert channels["deadLetters"]["address"] == s.dead_letter_topic
    for ch in channels.values():
        assert ch["bindings"]["kafka"]["topic"] == ch["address"]
    group = asyncapi["operations"]["receiveRequests"]["bindings"]["kafka"]["groupId"]["default"]
    assert group == s.group_id


def test_asyncapi_request_message_matches_the_envelope_module(asyncapi: dict[str, Any]) -> None:
    message = asyncapi["components"]["messages"]["verificationRequest"]
    assert set(message["headers"]["properties"]) == {
        HEADER_MESSAGE_ID,
        HEADER_OPERATION,
        HEADER_SCHEMA_VERSION,
    }
    assert message["payload"]["schemaFormat"] == "application/schema+json;version=draft-07"
    assert message["payload"]["schema"]["$ref"] == "./envelope.schema.json"
    assert envelope_schema()["$schema"].startswith("http://json-schema.org/draft-07/")
    # The headers a real producer writes validate against the header schema, and the key is subject_id.
    env = envelope_module.envelope_from_dict(good())
    headers = {k: v.decode() for k, v in env.headers()}
    EcmaDraft7(message["headers"]).validate(headers)
    assert set(headers) == set(message["headers"]["properties"])
    assert env.key == env.subject_id.encode()
    assert "subject_id" in message["bindings"]["kafka"]["key"]["description"]


def test_asyncapi_result_message_matches_the_sinks(asyncapi: dict[str, Any]) -> None:
    message = asyncapi["components"]["messages"]["verificationResult"]
    assert message["payload"]["schema"]["$ref"] == "./result.schema.json"
    assert message["headers"]["required"] == [HEADER_MESSAGE_ID]
    # The results header literal in consumer/sinks/results.py is the envelope's header name.
    assert set(re.findall(r'\("(idv-[a-z-]+)", (?:record\.)?message_id', inspect.getsource(results))) == {
        HEADER_MESSAGE_ID
    }


def test_asyncapi_dead_letter_headers_match_the_sinks(asyncapi: dict[str, Any]) -> None:
    message = asyncapi["components"]["messages"]["deadLetter"]
    header_schema = message["headers"]
    assert list(header_schema["properties"]) == list(sinks.DLQ_HEADERS)
    assert header_schema["required"] == list(sinks.DLQ_HEADERS)
    assert header_schema["properties"][sinks.H_REASON]["enum"] == list(sinks.DLQ_REASONS)
    assert header_schema["properties"][sinks.H_DETAIL]["maxLength"] == len(
        sinks.DeadLetter("too_large", "d" * 999).detail
    )
    # Real dead-letter headers, as the daemon writes them, validate against the documented header schema.
    record = ConsumerRecord(
        topic="idv.requests",
        partition=3,
        offset=42,
        timestamp=1764367200123,
        timestamp_type=0,
        key=b"applicant-1",
        value=b"{}",
        checksum=None,
        serialized_key_size=11,
        serialized_value_size=2,
        headers=[(HEADER_MESSAGE_ID, b"msg-1"), ("custom", b"kept")],
    )
    for reason in sinks.DLQ_REASONS:
        written = sinks.dead_letter_headers(
            record, sinks.DeadLetter(reason, "detail", attempts=3), "g", 1764367300.5
        )
        as_text = {k: v.decode() for k, v in written}
        EcmaDraft7(header_schema).validate(as_text)
        assert [k for k, _ in written][-len(sinks.DLQ_HEADERS) :] == list(sinks.DLQ_HEADERS)


# -- the kcat example of docs/contract.md, run as written -----------------------------------------------


@pytest.mark.kafka
@pytest.mark.anyio
async def test_the_documented_kcat_example_produces_a_valid_request(kafka_bootstrap: str) -> None:
    from aiokafka import AIOKafkaConsumer
    from aiokafka.partitioner import DefaultPartitioner

    from tests.conftest import ROOT, create_topic, random_topic_name, service_missing

    if shutil.which("kcat") is None:
        service_missing("kcat", "apt-get install -y kcat")
    doc = (ROOT / "docs" / "contract.md").read_text(encoding="utf-8")
    section = doc.split("## Producing from another language: kcat", 1)[1]
    script = section.split("```bash\n", 1)[1].split("```", 1)[0]
    topic = await create_topic(kafka_bootstrap, random_topic_name("contract"), 8)
    script = script.replace("B=127.0.0.1:9092", f"B={kafka_bootstrap}").replace(
        "-t idv.requests", f"-t {topic}"
    )
    assert f"-t {topic}" in script
    if shutil.which("uuidgen") is None:  # util-linux's uuidgen is not on every image; the doc may assume it
        script = script.replace("$(uuidgen)", str(uuid.uuid4()))
    with anyio.fail_after(60):
        result = await anyio.run_process(["bash", "-euo", "pipefail", "-c", script], check=False)
    assert result.returncode == 0, result.stderr
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        batch = await consumer.getmany(timeout_ms=10_000)
    finally:
        await consumer.stop()
    (record,) = [r for records in batch.values() for r in records]
    env = decode(record.value, record.headers)  # header idv-message-id checked against the body
    assert record.key == env.subject_id.encode()
    assert dict(record.headers)[HEADER_MESSAGE_ID] == env.message_id.encode()
    assert schema_accepts(envelope_schema(), orjson.loads(record.value))
    # murmur2_random: the same partition the Java client and aiokafka (idv-publish) choose.
    assert record.partition == DefaultPartitioner()(record.key, list(range(8)), list(range(8)))


@pytest.mark.parametrize(
    "image",
    [
        {"document": "local:sha256/ab/" + "ab" * 32 + ".jpg"},
        {"document": "https://docs.example.com/kyc/1?v=2"},
        {"document": "s3://bucket/key"},  # any scheme: whether the daemon serves it is decided at open
        {"document": "local:" + "a" * (MAX_DOCUMENT_URI_LENGTH - len("local:"))},
        "A" * MAX_INLINE_IMAGE_CHARS,
        "aGVsbG8=",
    ],
)
def test_images_accepted_by_decoder_and_schema(image: object, schema: dict[str, Any]) -> None:
    obj = good(operation="id_verification", request={"document_type": "passport", "front_image": image})
    obj["request"]["back_image"] = image
    assert decode(orjson.dumps(obj)).request["front_image"] == image
    assert schema_accepts(schema, obj)
