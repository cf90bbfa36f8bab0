"""Dead-letter encryption at rest: AES-256-GCM envelope of a dead letter's value, keyed by key id.

A dead letter keeps the original request bytes (names, document numbers, images) so it can be redriven.
With ``IDV_DLQ_ENCRYPTION_KEYS`` set, the daemon and the tools write the value as
``version (1 byte) || nonce (12 bytes) || ciphertext+tag`` and name the key in the ``idv-dlq-key-id``
header. The associated data binds the ciphertext to the record it belongs to: the original topic,
partition and offset and the key id, so a value copied into another dead letter's record (or a header
edited to point elsewhere) fails authentication instead of redriving someone else's request.

Keys: ``kid:base64key,kid:base64key,…``; each key is 32 bytes (AES-256). The **first** one encrypts new
dead letters; all are accepted for decryption (rotation: put the new key first, keep the old one listed
until no dead letter under it is needed any more). The key values never appear in ``repr`` or logs.

``cryptography`` is an optional dependency (extra ``encryption``), imported only when keys are used.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Sequence
from typing import Any

from consumer.errors import ConfigurationError

__all__ = [
    "FORMAT_VERSION",
    "H_KEY_ID",
    "DeadLetterCipher",
    "DecryptError",
    "UnknownKeyId",
    "cipher_from_settings",
    "parse_keys",
    "seal_dead_letter",
]

H_KEY_ID = "idv-dlq-key-id"
FORMAT_VERSION = 1
NONCE_BYTES = 12  # 96-bit random nonce per record (the GCM standard size)
KEY_BYTES = 32
_VAR = "IDV_DLQ_ENCRYPTION_KEYS"


class DecryptError(Exception):
    """A dead letter's value cannot be decrypted: wrong key, tampered ciphertext or associated data."""


class UnknownKeyId(DecryptError):
    """The dead letter names a key id that is not configured."""


def parse_keys(spec: str) -> list[tuple[str, bytes]]:
    """``kid:base64key,…`` → ``[(kid, key), …]``; raises :class:`ConfigurationError` (never showing a key)."""
    keys: list[tuple[str, bytes]] = []
    for n, item in enumerate(part.strip() for part in spec.split(",")):
        if not item:
            continue
        kid, sep, b64 = item.partition(":")
        kid = kid.strip()
        if not sep or not kid or not kid.isascii() or not kid.isprintable():
            raise ConfigurationError(f"{_VAR}: entry {n + 1} must be <key id>:<base64 key>")
        try:
            key = base64.b64decode(b64.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigurationError(f"{_VAR}: key {kid!r} is not valid base64") from None
        if len(key) != KEY_BYTES:
            raise ConfigurationError(
                f"{_VAR}: key {kid!r} must be {KEY_BYTES} bytes (AES-256), got {len(key)} "
                "(make one with `openssl rand -base64 32`)"
            )
        if any(kid == k for k, _ in keys):
            raise ConfigurationError(f"{_VAR}: key id {kid!r} appears twice")
        keys.append((kid, key))
    return keys


def _aad(kid: str, topic: str, partition: int, offset: int) -> bytes:
    return b"idv-dlq-v1\x00" + b"\x00".join(
        (kid.encode(), topic.encode("utf-8", "surrogateescape"), b"%d" % partition, b"%d" % offset)
    )


class DeadLetterCipher:
    """Encrypts dead-letter values with the current key; decrypts with any configured key."""

    __slots__ = ("_aead", "current")

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        if not keys:
            raise ValueError("at least one key is needed")
        try:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        except ImportError:
            raise ConfigurationError(
                f"{_VAR} needs the 'cryptography' package: pip install 'idv-exactly-once[encryption]'"
            ) from None
        self._aead: dict[str, Any] = {kid: AESGCM(key) for kid, key in keys}
        self.current = keys[0][0]

    def __repr__(self) -> str:
        return f"DeadLetterCipher(current={self.current!r}, key_ids={list(self._aead)!r})"

    @property
    def key_ids(self) -> list[str]:
        return list(self._aead)

    def encrypt(self, value: bytes, *, topic: str, partition: int, offset: int) -> tuple[bytes, str]:
        """``(envelope, key id)`` for the original record at ``topic``/``partition``/``offset``."""
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead[self.current].encrypt(nonce, value, _aad(self.current, topic, partition, offset))
        return bytes((FORMAT_VERSION,)) + nonce + sealed, self.current

    def decrypt(self, envelope: bytes, *, kid: str, topic: str, partition: int, offset: int) -> bytes:
        aead = self._aead.get(kid)
        if aead is None:
            raise UnknownKeyId(f"dead letter encrypted with unknown key id {kid!r}")
        if len(envelope) < 1 + NONCE_BYTES + 16 or envelope[0] != FORMAT_VERSION:
            raise DecryptError("dead letter value is not an encrypted envelope of a known version")
        from cryptography.exceptions import InvalidTag

        nonce, sealed = envelope[1 : 1 + NONCE_BYTES], envelope[1 + NONCE_BYTES :]
        try:
            return bytes(aead.decrypt(nonce, sealed, _aad(kid, topic, partition, offset)))
        except InvalidTag:
            raise DecryptError(
                f"dead letter does not authenticate under key id {kid!r} "
                "(tampered, or moved from another record)"
            ) from None

    def seal(
        self,
        value: bytes | None,
        headers: list[tuple[str, bytes]],
        *,
        topic: str,
        partition: int,
        offset: int,
    ) -> tuple[bytes | None, list[tuple[str, bytes]]]:
        """The dead letter's value and headers, encrypted (an absent value stays absent)."""
        if value is None:
            return None, headers
        envelope, kid = self.encrypt(value, topic=topic, partition=partition, offset=offset)
        return envelope, [*(h for h in headers if h[0] != H_KEY_ID), (H_KEY_ID, kid.encode())]


def cipher_from_settings(spec: str) -> DeadLetterCipher | None:
    """The cipher for ``IDV_DLQ_ENCRYPTION_KEYS`` (``Settings.dlq_encryption_keys``), None when unset."""
    keys = parse_keys(spec) if spec.strip() else []
    return DeadLetterCipher(keys) if keys else None


def seal_dead_letter(
    cipher: DeadLetterCipher | None, msg: Any, value: bytes | None, headers: list[tuple[str, bytes]]
) -> tuple[bytes | None, list[tuple[str, bytes]]]:
    """The dead letter of ``msg`` (a ConsumerRecord) as written: encrypted when a cipher is configured."""
    if cipher is None:
        return value, headers
    return cipher.seal(value, headers, topic=msg.topic, partition=msg.partition, offset=msg.offset)
