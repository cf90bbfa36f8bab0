"""Encrypted dead letters (consumer/dlqcrypto.py): unit tests of the envelope, then end to end on the real
broker: the daemon writes them encrypted, ``dlq list`` reads only headers, ``dlq redrive`` decrypts
(with the current key, or an old key still listed) and counts what it cannot decrypt."""

from __future__ import annotations

import base64
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiokafka.structs import ConsumerRecord

from consumer.dlqcrypto import H_KEY_ID, DeadLetterCipher, DecryptError, UnknownKeyId, parse_keys
from consumer.errors import ConfigurationError
from consumer.settings import Settings
from consumer.tools.dlq import entry_of, open_dead_letter
from producer.envelope import encode
from tests.consumer.conftest import API_KEY, FINGERPRINT_KEY, Sandbox, keys_for, publish_raw, read_all
from tests.consumer.test_exactly_once import make_envelopes, run_until_committed, settings_for
from tests.consumer.test_replay import Cli, make_cli, records_of
from tests.ledger import assert_ledger_exactly_once

K1 = base64.b64encode(b"\x01" * 32).decode()
K2 = base64.b64encode(b"\x02" * 32).decode()
WHERE = {"topic": "idv.requests", "partition": 3, "offset": 42}


def test_round_trip_with_random_nonce_and_key_id() -> None:
    cipher = DeadLetterCipher(parse_keys(f"k1:{K1}"))
    a, kid = cipher.encrypt(b"Jane Roe, passport X123", **WHERE)  # type: ignore[arg-type]
    b, _ = cipher.encrypt(b"Jane Roe, passport X123", **WHERE)  # type: ignore[arg-type]
    assert kid == "k1" and a != b  # a fresh 96-bit nonce per record
    assert b"Jane" not in a and len(a) == 1 + 12 + len(b"Jane Roe, passport X123") + 16
    assert cipher.decrypt(a, kid="k1", **WHERE) == b"Jane Roe, passport X123"  # type: ignore[arg-type]
    assert cipher.decrypt(cipher.encrypt(b"", **WHERE)[0], kid="k1", **WHERE) == b""  # type: ignore[arg-type]


def test_rotation_new_key_encrypts_old_key_still_decrypts() -> None:
    old = DeadLetterCipher(parse_keys(f"k1:{K1}"))
    sealed, _ = old.encrypt(b"payload", **WHERE)  # type: ignore[arg-type]
    rotated = DeadLetterCipher(parse_keys(f"k2:{K2}, k1:{K1}"))
    assert rotated.current == "k2"
    assert rotated.decrypt(sealed, kid="k1", **WHERE) == b"payload"  # type: ignore[arg-type]
    new, kid = rotated.encrypt(b"payload", **WHERE)  # type: ignore[arg-type]
    assert kid == "k2"
    with pytest.raises(UnknownKeyId, match="'k2'"):
        old.decrypt(new, kid="k2", **WHERE)  # type: ignore[arg-type]


def test_tampered_ciphertext_or_associated_data_is_rejected() -> None:
    cipher = DeadLetterCipher(parse_keys(f"k1:{K1},k2:{K2}"))
    sealed, _ = cipher.encrypt(b"payload", **WHERE)  # type: ignore[arg-type]
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(DecryptError):
        cipher.decrypt(flipped, kid="k1", **WHERE)  # type: ignore[arg-type]
    for moved in ({"offset": 43}, {"partition": 4}, {"topic": "other"}):
        with pytest.raises(DecryptError, match="moved from another record"):
            cipher.decrypt(sealed, kid="k1", **{**WHERE, **moved})  # type: ignore[arg-type]
    with pytest.raises(DecryptError):  # the key id is bound too: a header edited to another key fails
        cipher.decrypt(sealed, kid="k2", **WHERE)  # type: ignore[arg-type]
    with pytest.raises(DecryptError, match="not an encrypted envelope"):
        cipher.decrypt(b"{plain json}", kid="k1", **WHERE)  # type: ignore[arg-type]


def test_key_parsing_and_no_key_in_repr_or_errors() -> None:
    with pytest.raises(ConfigurationError, match="32 bytes") as short:
        parse_keys("k1:" + base64.b64encode(b"s3cr3t-short").decode())
    assert "s3cr3t" not in str(short.value) and base64.b64encode(b"s3cr3t-short").decode() not in str(
        short.value
    )
    with pytest.raises(ConfigurationError, match="base64"):
        parse_keys("k1:not base64!")
    with pytest.raises(ConfigurationError, match="<key id>:<base64 key>"):
        parse_keys(K1)
    with pytest.raises(ConfigurationError, match="twice"):
        parse_keys(f"k1:{K1},k1:{K2}")
    cipher = DeadLetterCipher(parse_keys(f"k1:{K1}"))
    assert K1 not in repr(cipher) and "k1" in repr(cipher)
    settings = Settings(provider_api_key="x", fingerprint_key="f" * 16, dlq_encryption_keys=f"k1:{K1}")
    assert K1 not in repr(settings)
    assert "IDV_DLQ_ENCRYPTION_KEYS_FILE" in Settings.secret_file_names()


def test_keys_from_file(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"k2:{K2},k1:{K1}\n")
    env = {"IDV_PROVIDER_API_KEY": API_KEY, "IDV_FINGERPRINT_KEY": FINGERPRINT_KEY}
    settings = Settings.from_env({**env, "IDV_DLQ_ENCRYPTION_KEYS_FILE": str(path)})
    cipher = settings.dlq_cipher()
    assert cipher is not None and cipher.key_ids == ["k2", "k1"]
    assert Settings.from_env(env).dlq_cipher() is None
    with pytest.raises(ConfigurationError, match="IDV_DLQ_ENCRYPTION_KEYS"):
        Settings.from_env({**env, "IDV_DLQ_ENCRYPTION_KEYS": "k1:AAAA"})


def test_open_dead_letter_decrypts_and_refuses_without_keys() -> None:
    cipher = DeadLetterCipher(parse_keys(f"k1:{K1}"))
    sealed, kid = cipher.encrypt(b'{"x": 1}', **WHERE)  # type: ignore[arg-type]
    headers = [
        ("trace-id", b"t"),
        ("idv-dlq-reason", b"retries_exhausted"),
        ("idv-dlq-original-topic", b"idv.requests"),
        ("idv-dlq-original-partition", b"3"),
        ("idv-dlq-original-offset", b"42"),
        (H_KEY_ID, kid.encode()),
    ]
    msg = ConsumerRecord("idv.requests.dlq", 0, 7, 1, 0, b"k", sealed, None, 1, len(sealed), headers)
    entry = entry_of(msg)
    assert entry.key_id == "k1"
    original = open_dead_letter(msg, entry, cipher)
    assert original.value == b'{"x": 1}' and original.headers == [("trace-id", b"t")]
    assert (original.topic, original.partition, original.offset) == ("idv.requests", 3, 42)
    with pytest.raises(DecryptError, match="no IDV_DLQ_ENCRYPTION_KEYS"):
        open_dead_letter(msg, entry, None)


async def redrive_direct(cli: Cli, keys: str) -> tuple[int, dict[str, Any] | None, str, str]:
    """``dlq redrive --direct`` of the ``retries_exhausted`` dead letters, under these encryption keys."""
    return await cli("dlq", "redrive", "--reason", "retries_exhausted", "--direct", "--json",
                     env={"IDV_DLQ_ENCRYPTION_KEYS": keys})  # fmt: skip


@pytest.mark.anyio
@pytest.mark.kafka
async def test_encrypted_dead_letters_end_to_end(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path
) -> None:
    doomed = make_envelopes(3, seed=77)
    sb.faults(error_rate=1.0)
    records = records_of(doomed)
    await publish_raw(kafka_bootstrap, topic, records, partition=2)
    group = "live-" + uuid.uuid4().hex[:6]
    await run_until_committed(
        settings_for(
            kafka_bootstrap,
            topic,
            group,
            sqlite_url,
            sb.url,
            provider_max_attempts=2,
            breaker_min_calls=1000,
            dlq_encryption_keys=f"k1:{K1}",
        )  # fmt: skip
    )
    letters = await read_all(kafka_bootstrap, f"{topic}.dlq")
    assert len(letters) == 3
    plain = {encode(e) for e in doomed}
    for m in letters:
        assert dict(m.headers)[H_KEY_ID] == b"k1"
        assert m.value not in plain and b"vendor_data" not in m.value and b"case-" not in m.value
        assert dict(m.headers)["idv-dlq-reason"] == b"retries_exhausted"

    # dlq list needs no key (it never reads values).
    cli = make_cli(kafka_bootstrap, topic, group, sqlite_url, sb.url, tmp_path, provider_max_attempts=2)
    code, _, out, err = await cli("dlq", "list")
    assert code == 0, err
    assert out.count("retries_exhausted") == 3 and "3 shown of 3" in out

    # Without the key that encrypted them: each one is counted as undecryptable, nothing is sent.
    sb.faults(error_rate=0.0)
    code, summary, _, err = await redrive_direct(cli, f"k2:{K2}")
    assert code == 1, err
    assert summary is not None and summary["counts"] == {"undecryptable dead letter": 3}
    assert sum(sb.side_effects().values()) == 0
    assert K2 not in err and K1 not in err

    # Rotated: the new key first, the old one still listed: decrypts and completes each exactly once.
    code, summary, _, err = await redrive_direct(cli, f"k2:{K2},k1:{K1}")
    assert code == 0, err
    assert summary is not None and summary["counts"] == {"completed": 3}
    assert_ledger_exactly_once(sb.ledger(), keys_for(doomed))
    assert K2 not in err and K1 not in err


@pytest.mark.anyio
@pytest.mark.kafka
async def test_redrive_with_the_writing_key_republishes_the_plaintext(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path
) -> None:
    bad = [(b"bad", b'{"not": "an envelope", "name": "Jane Roe"}', [("trace-id", b"t")])]
    await publish_raw(kafka_bootstrap, topic, bad, partition=1)
    group = "live-" + uuid.uuid4().hex[:6]
    keys = f"k1:{K1}"
    await run_until_committed(
        settings_for(kafka_bootstrap, topic, group, sqlite_url, sb.url, dlq_encryption_keys=keys)
    )
    [letter] = await read_all(kafka_bootstrap, f"{topic}.dlq")
    assert b"Jane" not in letter.value and dict(letter.headers)[H_KEY_ID] == b"k1"
    cli = make_cli(kafka_bootstrap, topic, group, sqlite_url, sb.url, tmp_path, dlq_encryption_keys=keys)
    reason = dict(letter.headers)["idv-dlq-reason"].decode()
    code, summary, _, err = await cli("dlq", "redrive", "--reason", reason, "--republish", "--json")
    assert code == 0, err
    assert summary is not None and summary["counts"] == {"republished": 1}
    # Keyed as before: it lands where "bad" maps to; the original stays at partition 1, offset 0.
    back = [m for m in await read_all(kafka_bootstrap, topic) if (m.partition, m.offset) != (1, 0)]
    assert [(m.key, m.value, list(m.headers)) for m in back] == [(b"bad", bad[0][1], [("trace-id", b"t")])]
    assert os.environ.get("IDV_DLQ_ENCRYPTION_KEYS") is None
