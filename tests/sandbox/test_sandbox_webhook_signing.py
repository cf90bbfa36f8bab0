"""Didit webhook signatures: the fixed vectors, reproduced by the sandbox and by an independent check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sandbox.signing import canonical_v2, shorten_floats, signature_headers, simple_message
from tests.sandbox.didit_webhook_check import canonical, check_delivery, hex_hmac

VECTORS: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent / "webhook_vectors.json").read_text("utf-8")
)["vectors"]


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vectors_match_the_independent_implementation(vector: dict[str, Any]) -> None:
    raw = vector["raw_body"].encode("utf-8")
    body = json.loads(raw)
    secret = vector["secret"]
    assert canonical(body) == vector["canonical_v2"]
    assert hex_hmac(secret, raw) == vector["x_signature"]
    assert hex_hmac(secret, vector["canonical_v2"].encode()) == vector["x_signature_v2"]
    assert hex_hmac(secret, vector["simple_message"].encode()) == vector["x_signature_simple"]
    assert vector["simple_message"] == ":".join(
        str(body[k]) for k in ("timestamp", "session_id", "status", "webhook_type")
    )


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_the_sandbox_signs_the_vectors(vector: dict[str, Any]) -> None:
    raw = vector["raw_body"].encode("utf-8")
    headers = signature_headers(vector["secret"], raw)
    assert headers == {
        "X-Signature": vector["x_signature"],
        "X-Signature-V2": vector["x_signature_v2"],
        "X-Signature-Simple": vector["x_signature_simple"],
        "X-Timestamp": str(vector["timestamp"]),
    }
    assert canonical_v2(json.loads(raw)).decode() == vector["canonical_v2"]
    assert simple_message(json.loads(raw)).decode() == vector["simple_message"]
    assert check_delivery(vector["secret"], raw, headers, now=vector["timestamp"] + 299) == {
        "raw": True,
        "v2": True,
        "simple": True,
        "fresh": True,
    }


def test_the_vectors_cover_what_differs_between_raw_and_canonical() -> None:
    raws = [v["raw_body"] for v in VECTORS]
    assert any(not r.isascii() for r in raws)  # non-ASCII: raw UTF-8 vs \u escapes
    assert any("96.0" in r for r in raws)  # a whole-number float
    assert any("\n" in r for r in raws)  # whitespace the canonical form drops
    assert all(v["x_signature"] != v["x_signature_v2"] for v in VECTORS)


def test_what_breaks_a_signature() -> None:
    vector = VECTORS[1]
    raw = vector["raw_body"].encode("utf-8")
    headers = signature_headers(vector["secret"], raw)
    tampered = raw.replace(b'"Approved"', b'"Declined"', 1)
    assert check_delivery(vector["secret"], tampered, headers, now=vector["timestamp"]) == {
        "raw": False,
        "v2": False,
        "simple": False,
        "fresh": True,
    }
    wrong = check_delivery("other-secret", raw, headers, now=vector["timestamp"])
    assert (wrong["raw"], wrong["v2"], wrong["simple"]) == (False, False, False)
    assert not check_delivery(vector["secret"], raw, headers, now=vector["timestamp"] + 301)["fresh"]
    # Re-serialised by a framework (spaces, other key order, \u escapes): only the raw signature breaks.
    reserialised = json.dumps(json.loads(raw), indent=1, sort_keys=True).encode()
    again = check_delivery(vector["secret"], reserialised, headers, now=vector["timestamp"])
    assert (again["raw"], again["v2"], again["simple"]) == (False, True, True)


def test_shorten_floats_only_touches_whole_floats() -> None:
    assert shorten_floats({"a": [1.0, 1.5, 2, True, None, "3.0"], "b": {"c": -0.0}}) == {
        "a": [1, 1.5, 2, True, None, "3.0"],
        "b": {"c": 0},
    }
    assert isinstance(shorten_floats(1.0), int)
