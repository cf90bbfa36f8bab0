"""Didit webhook signatures against fixed vectors.

The expected digests below were computed once with ``openssl dgst -sha256 -hmac`` over the literal strings
written out here (the raw body as sent, and its canonical V2 form typed by hand from the documented recipe:
keys sorted, compact separators, 95.0 written as 95, non-ASCII as UTF-8), not with the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from consumer.webhooks.signature import (
    HEADER_RAW,
    HEADER_SIMPLE,
    HEADER_TIMESTAMP,
    HEADER_V2,
    SignatureRejected,
    WebhookVerifier,
    canonical_v2,
    sign_raw,
    sign_simple,
    sign_v2,
)

SECRET = "whsec-test-current-7c1e"
PREVIOUS = "whsec-test-previous-2b9d"
UNKNOWN = "whsec-test-unknown-0000"
TS = 1767225600
SESSION = "11111111-2222-4333-8444-555555555555"

# What the sender put on the wire: unsorted, with spaces, a whole-number float and a non-ASCII name.
BODY = (
    '{"webhook_type": "status.updated", "session_id": "11111111-2222-4333-8444-555555555555", '
    '"status": "Approved", "created_at": 1767225594, "timestamp": 1767225600, "workflow_id": "wf-0001", '
    '"vendor_data": "applicant-42", "metadata": {"idv_key": "idv_0123456789abcdef0123456789abcdef"}, '
    '"decision": {"id_verifications": [{"status": "Approved", "first_name": "José", "score": 95.0, '
    '"ratio": 0.25}]}}'
).encode()
CANONICAL = (
    '{"created_at":1767225594,"decision":{"id_verifications":[{"first_name":"José","ratio":0.25,'
    '"score":95,"status":"Approved"}]},"metadata":{"idv_key":"idv_0123456789abcdef0123456789abcdef"},'
    '"session_id":"11111111-2222-4333-8444-555555555555","status":"Approved","timestamp":1767225600,'
    '"vendor_data":"applicant-42","webhook_type":"status.updated","workflow_id":"wf-0001"}'
).encode()

V2_CURRENT = "2486f9c418a0ef6bdfe67e0116f75b74e5f968a7487ab3b8bcb9af242b2cc3e8"
V2_ASCII = "44023a2673f15bd7e9d7e0a48252a74b1e94d9cfd68f503f42c722a5c78be6fb"  # é written as \u00e9
V2_PREVIOUS = "406fba32819ced4cfb7580e95101790aa8293e6237461a615653209b5b8cc028"
V2_UNKNOWN = "bba751848a700aaad9f49fdcf2aa46ba68150946aa5698cb478d802ceb92d2b8"
RAW_CURRENT = "583754443c4a07a286baf2b01caea52f38f2c82e8195b25d00308e6b32651f55"
RAW_PREVIOUS = "ff56e21714ad56b88cead9dbf19c6c159ce9c9b493c9c2b0372858bc71a4c265"
RAW_UNKNOWN = "467527b2811af15bf37af4886c7fc11a709604803b84ef49ff441c1c68dd9227"
SIMPLE = "de7c1ec2353e34a0d844268b71077bc2dd3b80b1b0f7e86b12c3cd710f9ce8b6"


def verifier(*secrets: str, now: float = TS, window_s: float = 300.0) -> WebhookVerifier:
    return WebhookVerifier(secrets or (SECRET,), window_s=window_s, clock=lambda: now)


def headers(ts: int | str | None = TS, **sigs: str) -> dict[str, str]:
    out = {} if ts is None else {HEADER_TIMESTAMP: str(ts)}
    names = {"v2": HEADER_V2, "raw": HEADER_RAW, "simple": HEADER_SIMPLE}
    out.update({names[k]: v for k, v in sigs.items()})
    return out


def rejected(v: WebhookVerifier, body: bytes, hdrs: dict[str, str]) -> str:
    with pytest.raises(SignatureRejected) as info:
        v.verify(body, hdrs)
    return info.value.reason


# -- the recipe ----------------------------------------------------------------------------------------


def test_the_recipes_reproduce_the_fixed_vectors() -> None:
    payload = json.loads(BODY)
    assert canonical_v2(payload) == CANONICAL
    assert sign_v2(SECRET, payload) == V2_CURRENT
    assert sign_v2(PREVIOUS, payload) == V2_PREVIOUS
    assert sign_raw(SECRET, BODY) == RAW_CURRENT
    assert sign_simple(SECRET, payload) == SIMPLE
    assert canonical_v2(payload, ascii_escapes=True) == CANONICAL.replace("é".encode(), b"\\u00e9")


def test_valid_v2() -> None:
    result = verifier().verify(BODY, headers(v2=V2_CURRENT))
    assert (result.method, result.secret) == ("v2", 0)
    assert result.payload["session_id"] == SESSION


def test_v2_is_tried_before_the_raw_signature() -> None:
    result = verifier().verify(BODY, headers(v2=V2_CURRENT, raw=RAW_CURRENT))
    assert result.method == "v2"


def test_valid_raw_only() -> None:
    result = verifier().verify(BODY, headers(raw=RAW_CURRENT))
    assert (result.method, result.secret) == ("raw", 0)


def test_a_wrong_v2_falls_back_to_a_valid_raw_signature() -> None:
    assert verifier().verify(BODY, headers(v2=V2_UNKNOWN, raw=RAW_CURRENT)).method == "raw"


def test_v2_survives_a_re_encoded_body_the_raw_signature_does_not() -> None:
    # A proxy or framework that parsed and re-wrote the JSON (ASCII escapes, other order and spacing).
    reencoded = json.dumps(json.loads(BODY), indent=2, sort_keys=False).encode()
    assert reencoded != BODY and b"\\u00e9" in reencoded
    assert verifier().verify(reencoded, headers(v2=V2_CURRENT)).method == "v2"
    assert rejected(verifier(), reencoded, headers(raw=RAW_CURRENT)) == "bad_signature"


def test_the_ascii_escaped_reading_of_v2_is_accepted_too() -> None:
    assert verifier().verify(BODY, headers(v2=V2_ASCII)).method == "v2"


def test_hex_case_and_surrounding_space_do_not_matter() -> None:
    assert verifier().verify(BODY, headers(v2=f" {V2_CURRENT.upper()} ")).method == "v2"


def test_tampered_body() -> None:
    tampered = BODY.replace(b'"status": "Approved", "created_at"', b'"status": "Declined", "created_at"')
    assert tampered != BODY
    assert rejected(verifier(), tampered, headers(v2=V2_CURRENT, raw=RAW_CURRENT)) == "bad_signature"
    # A whole-number float changed to another value is a different document, not a formatting detail.
    assert rejected(verifier(), BODY.replace(b"95.0", b"95.5"), headers(v2=V2_CURRENT)) == "bad_signature"


def test_wrong_secret() -> None:
    assert rejected(verifier(), BODY, headers(v2=V2_UNKNOWN, raw=RAW_UNKNOWN)) == "bad_signature"
    assert rejected(verifier(UNKNOWN), BODY, headers(v2=V2_CURRENT, raw=RAW_CURRENT)) == "bad_signature"


@pytest.mark.parametrize(
    ("now", "fresh"),
    [(TS + 300, True), (TS + 301, False), (TS + 86_400, False), (TS - 300, True), (TS - 301, False)],
    ids=["stale-edge", "stale", "stale-day", "future-edge", "future"],
)
def test_stale_or_future_timestamp(now: int, fresh: bool) -> None:
    v = verifier(now=now)
    if fresh:
        assert v.verify(BODY, headers(v2=V2_CURRENT)).method == "v2"
    else:
        assert rejected(v, BODY, headers(v2=V2_CURRENT)) == "stale_timestamp"


def test_the_window_is_configurable() -> None:
    assert verifier(now=TS + 60, window_s=120).verify(BODY, headers(v2=V2_CURRENT)).method == "v2"
    assert rejected(verifier(now=TS + 60, window_s=30), BODY, headers(v2=V2_CURRENT)) == "stale_timestamp"


def test_an_old_signed_body_with_a_fresh_timestamp_header_is_a_replay() -> None:
    # X-Timestamp is not under the MAC; the body's own signed timestamp is.
    later = TS + 3600
    assert rejected(verifier(now=later), BODY, headers(ts=later, v2=V2_CURRENT)) == "stale_timestamp"


@pytest.mark.parametrize(
    ("hdrs", "reason"),
    [
        (headers(ts=None, v2=V2_CURRENT, raw=RAW_CURRENT), "missing_timestamp"),
        (headers(), "missing_signature"),
        (headers(simple=SIMPLE), "missing_signature"),  # Simple leaves the decision unsigned
        (headers(v2=""), "missing_signature"),
        (headers(ts="", v2=V2_CURRENT), "missing_timestamp"),
        (headers(ts="1.7e9", v2=V2_CURRENT), "bad_timestamp"),
        (headers(ts="-5", v2=V2_CURRENT), "bad_timestamp"),
        (headers(ts="١٧٦٧٢٢٥٦٠٠", v2=V2_CURRENT), "bad_timestamp"),  # Unicode digits are not unix seconds
        (headers(v2="é" * 64), "bad_signature"),  # non-ASCII never reaches compare_digest
    ],
    ids=[
        "no-timestamp",
        "no-signature",
        "simple-only",
        "empty-v2",
        "empty-timestamp",
        "float-ts",
        "negative-ts",
        "arabic-digits",
        "non-ascii-signature",
    ],
)
def test_missing_or_malformed_headers(hdrs: dict[str, str], reason: str) -> None:
    assert rejected(verifier(), BODY, hdrs) == reason


def test_rotated_secret_previous_accepted_unknown_rejected() -> None:
    both = verifier(SECRET, PREVIOUS)
    assert both.verify(BODY, headers(v2=V2_CURRENT)).secret == 0
    result = both.verify(BODY, headers(v2=V2_PREVIOUS))
    assert (result.method, result.secret) == ("v2", 1)
    assert both.verify(BODY, headers(raw=RAW_PREVIOUS)).secret == 1
    assert rejected(both, BODY, headers(v2=V2_UNKNOWN, raw=RAW_UNKNOWN)) == "bad_signature"
    # Once the rotation is over (previous secret removed), its signatures stop working.
    assert rejected(verifier(SECRET), BODY, headers(v2=V2_PREVIOUS, raw=RAW_PREVIOUS)) == "bad_signature"


def test_a_non_json_body_can_only_match_the_raw_signature() -> None:
    body = b"not json at all"
    result = verifier().verify(body, headers(raw=sign_raw(SECRET, body)))
    assert (result.method, result.payload) == ("raw", None)
    assert rejected(verifier(), body, headers(v2=sign_raw(SECRET, body))) == "bad_signature"


def test_bodies_json_cannot_canonicalise_are_handled() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    assert rejected(verifier(), deep, headers(v2=V2_CURRENT)) == "bad_signature"
    lone_surrogate = b'{"name": "\\ud800", "timestamp": 1767225600}'
    # Not writable as UTF-8: only the ASCII-escaped reading of V2 exists for it.
    payload = json.loads(lone_surrogate)
    with pytest.raises(ValueError):
        canonical_v2(payload)
    ascii_sig = sign_raw(SECRET, canonical_v2(payload, ascii_escapes=True))
    assert verifier().verify(lone_surrogate, headers(v2=ascii_sig)).method == "v2"


def test_a_verifier_needs_a_secret_and_a_positive_window() -> None:
    with pytest.raises(ValueError):
        WebhookVerifier(["", ""])
    with pytest.raises(ValueError):
        WebhookVerifier([SECRET], window_s=0)


def test_rejections_never_echo_header_values_or_the_body() -> None:
    v = verifier()
    for hdrs in (headers(v2=V2_UNKNOWN), headers(ts=TS + 10_000, v2=V2_CURRENT), headers(ts="x" * 40)):
        with pytest.raises(SignatureRejected) as info:
            v.verify(BODY, hdrs)
        text = str(info.value)
        assert V2_UNKNOWN not in text and "applicant-42" not in text and "x" * 40 not in text


# -- the sandbox sender's vectors ----------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
SANDBOX_VECTORS = ROOT / "tests" / "sandbox" / "webhook_vectors.json"


def sandbox_vectors() -> list[dict[str, Any]]:
    if not SANDBOX_VECTORS.exists():
        pytest.fail(f"{SANDBOX_VECTORS} (the sandbox sender's signature vectors) is missing")
    vectors: list[dict[str, Any]] = json.loads(SANDBOX_VECTORS.read_text())["vectors"]
    assert vectors
    return vectors


def test_the_verifier_accepts_every_vector_of_the_sandbox_sender() -> None:
    """The sender (sandbox) and the verifier (intake) were written from the docs independently; their
    vectors must verify here with each header alone, and fail under another secret."""
    for v in sandbox_vectors():
        body, ts = v["raw_body"].encode(), int(v["timestamp"])
        ok, wrong = verifier(v["secret"], now=ts), verifier("not-" + v["secret"], now=ts)
        for method, hdrs in (
            ("v2", headers(ts=ts, v2=v["x_signature_v2"])),
            ("raw", headers(ts=ts, raw=v["x_signature"])),
        ):
            assert ok.verify(body, hdrs).method == method, (v["name"], method)
            assert rejected(wrong, body, hdrs) == "bad_signature", (v["name"], method)
        assert sign_simple(v["secret"], json.loads(body)) == v["x_signature_simple"], v["name"]
