"""Keyed fingerprints: HMAC-SHA256 with a scheme prefix; legacy plain SHA-256 still recognised."""

from __future__ import annotations

import hashlib
import hmac

import orjson

from consumer.keys import HMAC_V1, Fingerprinter, fingerprint
from producer.envelope import Envelope

KEY = "unit-test-fingerprint-key"


def _env(name: str = "Jane Roe", **kw: str) -> Envelope:
    request = {"full_name": name, "date_of_birth": "1990-01-01", "nationality": "FR"}
    return Envelope(message_id="m-1", operation="aml_screening", subject_id="s-1", request=request, **kw)


def test_keyed_fingerprint_is_hmac_sha256_of_the_canonical_request_with_its_scheme() -> None:
    env = _env()
    canonical = orjson.dumps(
        {"operation": "aml_screening", "subject_id": "s-1", "request": dict(env.request)},
        option=orjson.OPT_SORT_KEYS,
    )
    expected = HMAC_V1 + hmac.new(KEY.encode(), canonical, hashlib.sha256).hexdigest()
    assert fingerprint(env, KEY) == expected == Fingerprinter(KEY)(env)
    # The legacy scheme (no key) is the plain hash, bare hex: what older builds stored.
    assert fingerprint(env) == hashlib.sha256(canonical).hexdigest()
    # Re-stamped metadata is still the same request; another key gives another fingerprint.
    assert fingerprint(_env(correlation_id="c-2"), KEY) == expected
    assert fingerprint(env, "another-key-0123456") != expected


def test_a_dictionary_over_the_plain_hash_does_not_find_the_keyed_one() -> None:
    stored = fingerprint(_env("John Doe"), KEY)
    guesses = {fingerprint(_env(name)): name for name in ("Jane Roe", "John Doe", "Max Mustermann")}
    assert stored not in guesses and stored.removeprefix(HMAC_V1) not in guesses


def test_matches_compares_in_the_stored_scheme() -> None:
    fp = Fingerprinter(KEY)
    same, other = _env(), _env("John Doe")
    assert fp.matches(fingerprint(same, KEY), same)
    assert fp.matches(fingerprint(same), same)  # legacy record, same payload
    assert not fp.matches(fingerprint(other), same)
    assert not fp.matches(fingerprint(other, KEY), same)
    assert not fp.matches(fingerprint(same), other)
    assert not fp.matches("h9:" + "0" * 64, same)  # a scheme this build does not know
    assert not Fingerprinter(None).matches(fingerprint(same, KEY), same)  # no key: never an h1 match
    current, legacy = fp.with_legacy(same)
    assert current == fingerprint(same, KEY) and legacy == (fingerprint(same),)
    assert Fingerprinter(None).with_legacy(same) == (fingerprint(same), ())
