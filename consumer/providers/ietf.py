"""The ``ietf`` profile: a provider following the IETF Idempotency-Key draft (the sandbox, Stripe, Persona).

Every operation is a ``POST`` of the canonical request (JSON, sorted keys: the very bytes the fingerprint
covers) with the same ``Idempotency-Key`` on every attempt; the provider answers a repeat from its stored
response for ``IDV_PROVIDER_KEY_RETENTION_S`` (default 24 h). That closes the crash window after the
provider acted: no lookup is needed, and none exists (``lookup=False``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from consumer.answers import decision, error_code_of
from consumer.model import Outcome
from consumer.providers.base import Capability, PreparedCall, Sender, register_adapter
from producer.envelope import Envelope, Operation, canonical_request

if TYPE_CHECKING:
    from consumer.documents import DocumentSource
    from consumer.settings import Settings

__all__ = ["IetfAdapter"]

_JSON = (b"content-type", b"application/json")


def read_json_answer(operation: Operation, status_code: int, body: bytes) -> Outcome:
    """A 2xx answer through :func:`consumer.answers.decision`; any other (terminal) one as ``failed`` with
    the provider's error code."""
    if not 200 <= status_code < 300:
        return Outcome("failed", status_code, None, error_code_of(status_code, body))
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    status, reference, detail = decision(operation, parsed)
    return Outcome(status, status_code, reference, detail)


class IetfAdapter:
    name = "ietf"

    def __init__(self, key_retention_s: float = 24 * 3600.0) -> None:
        self.key_retention_s = key_retention_s

    def capability(self, operation: str) -> Capability:
        return Capability("idempotency_key", self.key_retention_s, lookup=False)

    async def prepare(
        self, operation: Operation, envelope: Envelope, key: str, documents: DocumentSource | None
    ) -> PreparedCall:
        headers = [_JSON, (b"idempotency-key", key.encode())]
        return PreparedCall("POST", operation.path, headers, canonical_request(envelope))

    def read(self, operation: Operation, status_code: int, body: bytes) -> Outcome:
        return read_json_answer(operation, status_code, body)

    async def lookup(
        self, operation: Operation, envelope: Envelope, key: str, since: float, send: Sender
    ) -> Outcome | None:
        # Never called (lookup=False): the provider's key store closes the window instead.
        return None

    def sign(self, call: PreparedCall, body: bytes) -> list[tuple[bytes, bytes]]:
        return []


def _factory(settings: Settings) -> IetfAdapter:
    return IetfAdapter(settings.provider_key_retention_s)


register_adapter("ietf", _factory)
