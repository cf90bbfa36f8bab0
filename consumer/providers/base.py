"""The provider adapter contract: how one provider's API is called, read, deduplicated and searched.

An adapter turns an envelope into the HTTP call one provider expects (:meth:`ProviderAdapter.prepare`:
method, path, headers, a JSON or multipart body), signs it where the provider wants signed requests
(:meth:`ProviderAdapter.sign`, once per attempt), reads the answer into an :class:`Outcome` with a complete
status map (:meth:`ProviderAdapter.read`), and says per operation how the provider recognises a repeat
(:class:`Capability`): by an ``Idempotency-Key`` it keeps for ``retention_s``, by a body field (Didit's
``vendor_data`` for unfinished sessions), or not at all; and whether an earlier attempt can be found again
by our reference (:meth:`ProviderAdapter.lookup`). Where the provider does not dedupe by key, the pipeline
reconciles before a send that could repeat an earlier one (docs/providers.md, docs/guarantees.md).

Transport, retries, deadlines, the circuit breaker and answer classification stay in
:class:`consumer.provider.ProviderClient` and :mod:`consumer.answers`: the adapter decides what is sent
and what an answer means, never when or how often.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from consumer.errors import ConfigurationError
from consumer.model import Outcome
from producer.envelope import Envelope, Operation

if TYPE_CHECKING:
    from consumer.documents import DocumentSource
    from consumer.multipart import MultipartBody
    from consumer.settings import Settings

Dedupe = Literal["idempotency_key", "body_field", "none"]


@dataclass(frozen=True, slots=True)
class Capability:
    """How a provider recognises a repeat of one operation, and whether an earlier attempt can be found.

    ``dedupe``: ``"idempotency_key"`` (the same key is answered from the provider's stored response for
    ``retention_s`` seconds), ``"body_field"`` (the provider returns an existing object for the same body
    field, e.g. Didit's unfinished session per ``vendor_data``: a partial dedupe, never relied on alone),
    ``"none"``. ``lookup``: an earlier attempt can be found by our reference (:meth:`ProviderAdapter.lookup`).
    """

    dedupe: Dedupe
    retention_s: float | None
    lookup: bool

    @property
    def by_key(self) -> bool:
        """True when the provider itself closes the crash window (it answers a repeat from its store)."""
        return self.dedupe == "idempotency_key"


@dataclass(frozen=True, slots=True)
class PreparedCall:
    """One request as the adapter built it; the client sends it on every attempt (``body`` re-iterable)."""

    method: str
    path: str
    headers: list[tuple[bytes, bytes]]
    body: bytes | MultipartBody


#: A read-only GET for lookups: ``await send(path_with_query)`` → (HTTP status, body). It retries
#: transport failures, 429 and 5xx itself (under the caller's lease) and raises
#: :class:`~consumer.errors.RetriesExhausted` when they go on, :class:`~consumer.errors.ProviderAuthError`
#: for 401/403.
Sender = Callable[[str], Awaitable[tuple[int, bytes]]]


@runtime_checkable
class ProviderAdapter(Protocol):
    name: str

    def capability(self, operation: str) -> Capability: ...

    async def prepare(
        self, operation: Operation, envelope: Envelope, key: str, documents: DocumentSource | None
    ) -> PreparedCall: ...

    def read(self, operation: Operation, status_code: int, body: bytes) -> Outcome: ...

    async def lookup(
        self, operation: Operation, envelope: Envelope, key: str, since: float, send: Sender
    ) -> Outcome | None: ...

    def sign(self, call: PreparedCall, body: bytes) -> list[tuple[bytes, bytes]]: ...


#: name → factory(settings). :func:`register_adapter` adds one (docs/providers.md, "Adding a provider").
ADAPTERS: dict[str, Callable[[Settings], ProviderAdapter]] = {}


def register_adapter(name: str, factory: Callable[[Settings], ProviderAdapter]) -> None:
    ADAPTERS[name] = factory


def adapter_from_settings(settings: Settings) -> ProviderAdapter:
    """The adapter ``IDV_PROVIDER`` names (``ietf``, the default; ``didit``; ``signed``)."""
    # Imported here so that each module registers itself; base never imports a provider at module level.
    from consumer.providers import didit, ietf, signed  # noqa: F401

    factory = ADAPTERS.get(settings.provider)
    if factory is None:
        raise ConfigurationError(
            f"IDV_PROVIDER: unknown provider {settings.provider!r} "
            f"(use one of: {', '.join(sorted(ADAPTERS))})"
        )
    return factory(settings)
