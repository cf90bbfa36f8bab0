"""The ``signed`` profile: a provider that wants every request signed (Veriff- or Sumsub-style HMAC).

Otherwise it is the ``ietf`` profile (JSON body, ``Idempotency-Key``, the same retention and no lookup).
Each attempt is signed afresh, so a retry carries a current timestamp:

    X-Timestamp: <unix seconds>
    X-Signature: hex(HMAC-SHA256(secret, "<timestamp><METHOD><path>" + body))

which is the shape Sumsub documents (timestamp, method, path with query, body) and covers what Veriff's
body signature covers. The secret is ``IDV_PROVIDER_SIGNING_SECRET`` (or ``_FILE``); it never appears in
logs or errors. A provider with another recipe needs its own :meth:`sign` (docs/providers.md).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from consumer.errors import ConfigurationError
from consumer.providers.base import PreparedCall, register_adapter
from consumer.providers.ietf import IetfAdapter

if TYPE_CHECKING:
    from consumer.settings import Settings

__all__ = ["SignedAdapter", "signature"]


def signature(secret: bytes, timestamp: str, method: str, path: str, body: bytes) -> str:
    """The hex HMAC-SHA256 the ``signed`` profile sends (and a provider recomputes)."""
    message = timestamp.encode() + method.upper().encode() + path.encode() + body
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


class SignedAdapter(IetfAdapter):
    name = "signed"

    def __init__(
        self,
        secret: str,
        key_retention_s: float = 24 * 3600.0,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not secret:
            raise ConfigurationError(
                "IDV_PROVIDER_SIGNING_SECRET: is required for IDV_PROVIDER=signed "
                "(or IDV_PROVIDER_SIGNING_SECRET_FILE)"
            )
        super().__init__(key_retention_s)
        self._secret = secret.encode()
        self._clock = clock

    def sign(self, call: PreparedCall, body: bytes) -> list[tuple[bytes, bytes]]:
        timestamp = str(int(self._clock()))
        digest = signature(self._secret, timestamp, call.method, call.path, body)
        return [(b"x-timestamp", timestamp.encode()), (b"x-signature", digest.encode())]


def _factory(settings: Settings) -> SignedAdapter:
    return SignedAdapter(settings.provider_signing_secret, settings.provider_key_retention_s)


register_adapter("signed", _factory)
