"""HTTP client for the identity-verification provider: attempts, retries, deadlines, breaker, gate.

What each request looks like and what an answer means is the provider's adapter (:mod:`consumer.providers`,
chosen by ``IDV_PROVIDER``); how answers are classified (terminal, retriable, configuration, in doubt) is
:mod:`consumer.answers`. This module decides when and how often to send.

Every attempt of one request carries the same key: it is derived once from the message ID (see
:mod:`consumer.keys`) and never regenerated. Where the provider dedupes by ``Idempotency-Key`` (the
``ietf`` and ``signed`` profiles) a retry after a lost answer is answered from its stored response.
Where it does not (``didit``), :meth:`ProviderClient.call_envelope` **reconciles** before any send that
could repeat an attempt that may have reached the provider (one taken over after a crash, or a retry
after a timeout, a dropped connection or a 5xx): the adapter looks the earlier attempt up by our
reference and its answer is recorded instead of calling again; when it cannot look (no lookup, or the
lookup kept failing) the call ends :class:`~consumer.errors.UnreconciledAttempt` (dead-lettered
``in_doubt``), never a second call. A retry after an attempt proven not to have reached it (never
connected, 429, 503 with ``Retry-After``) is sent without a lookup.

Every attempt has a hard total deadline (``timeout_s``): httpx's timeouts are per phase (a provider that
trickles its answer a byte at a time never trips a read timeout), so the whole attempt runs under
``anyio.fail_after``, or, on :mod:`consumer.http`'s transport, aiohttp's own total timeout (that exchange
is :mod:`consumer.exchange`; what one answer means for the call is :func:`read_answer` below). The lease
is sized against this deadline (``IDV_LEASE_S ≥ IDV_PROVIDER_TIMEOUT_S + LEASE_SLACK_S``).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import httpx
import orjson

from consumer.admission import Admission
from consumer.answers import (
    KEY_REUSED_CODES,
    classify_status,
    error_code,
    parse_retry_after,
    route_missing,
)
from consumer.breaker import BreakerState, CircuitBreaker
from consumer.concurrency import ProviderGate, sleep_keeping_alive
from consumer.documents import DocumentError, document_error_in
from consumer.errors import (
    ProviderAuthError,
    ProviderConfigError,
    ProviderInDoubt,
    ProviderRetriableError,
    RetriesExhausted,
)
from consumer.exchange import ProviderExchange
from consumer.providers.base import PreparedCall, ProviderAdapter, adapter_from_settings
from consumer.providers.calls import (
    TRANSPORT_KINDS,
    CallProgress,
    CallResult,
    RetryPolicy,
    gate_from_settings,
    make_transport,
)
from consumer.providers.ietf import IetfAdapter
from consumer.providers.reads import Hook, ReadCalls
from consumer.providers.reconcile import Reconciler
from producer.envelope import Envelope, Operation

if TYPE_CHECKING:
    from consumer.documents import DocumentSource
    from consumer.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = [
    "TRANSPORT_KINDS",
    "CallProgress",
    "CallResult",
    "ProviderClient",
    "RetryPolicy",
    "classify_status",
    "gate_from_settings",
    "make_transport",
    "parse_retry_after",
]


class ProviderClient(ProviderExchange, ReadCalls):
    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float = 10.0,
        retry: RetryPolicy | None = None,
        max_connections: int = 64,
        transport: httpx.AsyncBaseTransport | None = None,
        transport_kind: str = "httpx",
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        rng: random.Random | None = None,
        breaker: CircuitBreaker | None = None,
        on_attempt: Callable[[int | None, float], None] | None = None,
        retry_after_max_s: float = 60.0,
        gate: ProviderGate | None = None,
        on_replay: Callable[[], None] | None = None,
        adapter: ProviderAdapter | None = None,
        on_reconcile: Callable[[str], None] | None = None,
        admission: Admission | None = None,
    ) -> None:
        # What is sent and how answers read (consumer/providers/): the ietf profile unless told otherwise.
        self.adapter: ProviderAdapter = adapter if adapter is not None else IetfAdapter()
        # Called with "found", "not_found" or "in_doubt" after each reconciliation: metrics.
        self.on_reconcile = on_reconcile
        self.breaker = breaker
        # Concurrency limit and client-side rate limit of attempts (consumer/concurrency.py); None = none.
        self.gate = gate
        # A gateway answering Retry-After: 86400 must not park a partition for a day.
        self.retry_after_max_s = retry_after_max_s
        # Called after every attempt with (HTTP status or None for a transport error, seconds): metrics.
        self.on_attempt = on_attempt
        # Called for a success answer carrying Idempotent-Replayed: true (the provider had already acted on
        # this key and answered from its cache: an earlier attempt reached it): metrics.
        self.on_replay = on_replay
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        # The daemon's workers' admission: told when an attempt sleeps between retries (back-off,
        # Retry-After), whose worker then does not count against it (consumer/admission.py).
        self.admission = admission
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        super().__init__(
            base_url,
            api_key,
            timeout_s=timeout_s,
            max_connections=max_connections,
            transport=transport,
            transport_kind=transport_kind,
        )

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        on_breaker_change: Callable[[BreakerState], None] | None = None,
        on_attempt: Callable[[int | None, float], None] | None = None,
        on_replay: Callable[[], None] | None = None,
        on_reconcile: Callable[[str], None] | None = None,
        gate: ProviderGate | None = None,
        admission: Admission | None = None,
    ) -> ProviderClient:
        """The client the daemon and the replay tool use: settings' profile (``IDV_PROVIDER``), timeouts,
        retries, pool and breaker; ``gate``: the concurrency and rate limit (default: the settings', with
        no loop-lag signal), ``admission``: the daemon's workers' admission."""
        return cls(
            settings.provider_url,
            settings.provider_api_key,
            timeout_s=settings.provider_timeout_s,
            retry=RetryPolicy(
                settings.provider_max_attempts,
                settings.provider_backoff_base_s,
                settings.provider_backoff_max_s,
            ),
            max_connections=settings.provider_max_connections,
            breaker=CircuitBreaker.from_settings(settings, on_breaker_change),
            on_attempt=on_attempt,
            transport_kind=settings.provider_transport,
            retry_after_max_s=settings.provider_retry_after_max_s,
            gate=gate if gate is not None else gate_from_settings(settings),
            on_replay=on_replay,
            adapter=adapter_from_settings(settings),
            on_reconcile=on_reconcile,
            admission=admission,
        )

    async def _acquire(self, keep_alive: Hook | None, every: float) -> bool:
        assert self.breaker is not None
        return await keeping_alive(self.breaker.acquire, keep_alive, every)

    async def _wait(self, delay: float, keep_alive: Hook | None, every: float) -> None:
        with self.admission.backing_off() if self.admission is not None else nullcontext():
            await sleep_keeping_alive(self._sleep, delay, keep_alive, every)

    def _record(self, success: bool, probe: bool) -> None:
        if self.breaker is not None:
            self.breaker.record(success, probe=probe)

    async def call(
        self,
        operation: Operation,
        request: Mapping[str, Any] | bytes,
        idempotency_key: str,
        *,
        before_attempt: Callable[[int], Awaitable[None]] | None = None,
        progress: CallProgress | None = None,
        keep_alive: Hook | None = None,
        keep_alive_every_s: float = 20.0,
    ) -> CallResult:
        """POST ``request`` as JSON to the operation's endpoint with ``Idempotency-Key``, retrying retriable
        failures with the same key: the ``ietf`` request shape, for callers without an envelope (tools,
        benchmarks, tests). ``request`` is sent as given when it is bytes, else encoded with sorted keys.
        No reconciliation: use :meth:`call_envelope` for a profile without server-side idempotency."""
        body = request if isinstance(request, bytes) else orjson.dumps(request, option=orjson.OPT_SORT_KEYS)
        headers = [(b"content-type", b"application/json"), (b"idempotency-key", idempotency_key.encode())]
        prepared = PreparedCall("POST", operation.path, headers, body)
        hooks = (before_attempt, progress, keep_alive, keep_alive_every_s)
        return await self._attempts(operation, prepared, *hooks)

    async def call_envelope(
        self,
        operation: Operation,
        envelope: Envelope,
        key: str,
        *,
        documents: DocumentSource | None = None,
        earlier_claims: bool = False,
        since: float = 0.0,
        force: bool = False,
        before_attempt: Callable[[int], Awaitable[None]] | None = None,
        ensure_lease: Hook | None = None,
        progress: CallProgress | None = None,
        keep_alive: Hook | None = None,
        keep_alive_every_s: float = 20.0,
    ) -> CallResult:
        """The mutating call of one envelope, as the adapter builds it, exactly once (module docstring).

        ``earlier_claims``: the record was claimed before (a take-over or a redelivery after a crash), so an
        earlier attempt may have reached the provider; ``since`` is when the record was first claimed (the
        lookup searches from there). ``force`` (redrive ``--force``) sends without a lookup where the profile
        has none. ``before_attempt(n)`` runs before each attempt, after any wait in the circuit breaker;
        ``ensure_lease()`` before each lookup request; ``keep_alive()`` every ``keep_alive_every_s`` while
        waiting (breaker, backoff, ``Retry-After``). Raises :class:`ProviderAuthError`,
        :class:`ProviderInDoubt` (:class:`~consumer.errors.UnreconciledAttempt` among them) or
        :class:`RetriesExhausted`."""
        prepared = await self._prepare(operation, envelope, key, documents, keep_alive, keep_alive_every_s)
        reconcile = None
        if not self.adapter.capability(operation.name).by_key:

            async def send(path: str) -> tuple[int, bytes]:
                return await self._get(path, ensure_lease, keep_alive, keep_alive_every_s)

            reconcile = Reconciler(
                self.adapter, operation, envelope, key, since, send, on_result=self.on_reconcile, force=force
            )
        hooks = (before_attempt, progress, keep_alive, keep_alive_every_s)
        return await self._attempts(operation, prepared, *hooks, reconcile=reconcile, reached=earlier_claims)

    async def _prepare(
        self,
        operation: Operation,
        envelope: Envelope,
        key: str,
        documents: DocumentSource | None,
        keep_alive: Hook | None,
        every: float,
    ) -> PreparedCall:
        """The adapter's request; a document store that fails in a way that may pass is retried like a
        provider failure. Raises :class:`DocumentError` (nothing was sent)."""
        for attempt in range(1, self.retry.max_attempts + 1):
            try:
                return await self.adapter.prepare(operation, envelope, key, documents)
            except DocumentError as exc:
                if not exc.retriable or attempt == self.retry.max_attempts:
                    raise
                await self._wait(self.retry.backoff(attempt, self._rng), keep_alive, every)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _attempts(
        self,
        operation: Operation,
        prepared: PreparedCall,
        before_attempt: Callable[[int], Awaitable[None]] | None,
        progress: CallProgress | None,
        keep_alive: Hook | None,
        every: float,
        *,
        reconcile: Reconciler | None = None,
        reached: bool = False,
    ) -> CallResult:
        """The retry loop. ``reached``: an earlier attempt may have reached the provider; with a
        ``reconcile`` hook (a profile without server-side idempotency) every send from then on is preceded
        by a lookup, which may end the call with the earlier attempt's answer."""
        signed_body = prepared.body if isinstance(prepared.body, bytes) else b""
        progress = progress if progress is not None else CallProgress()
        last: ProviderRetriableError | None = None
        timed_out = False  # the last attempt ran out of time: the provider may still be working on it
        for attempt in range(1, self.retry.max_attempts + 1):
            if reconcile is not None and reached:
                found = await reconcile(attempt - 1)
                if found is not None:
                    return CallResult(found, terminal_failure=False, attempts=attempt - 1, reconciled=True)
            probe = False
            if self.breaker is not None and self.breaker.state is not BreakerState.CLOSED:
                # While the breaker is open the attempt waits here without spending the retry budget.
                probe = await self._acquire(keep_alive, every)
            started = time.perf_counter()
            gate = self.gate
            in_flight = -1  # >= 0 once this attempt holds a slot of the gate
            try:
                if gate is not None:
                    # The rate limit's token, then a concurrency slot (FIFO across partitions).
                    in_flight = await gate.enter(self._sleep, keep_alive, every)
                if before_attempt is not None:
                    await before_attempt(attempt)
                # Signed per attempt: a retry carries a current timestamp.
                headers = [
                    *self._base_headers,
                    *prepared.headers,
                    *self.adapter.sign(prepared, signed_body),
                ]
                started = time.perf_counter()
                progress.sent += 1
                progress.live = True
                response = await self._send(prepared.method, prepared.path, headers, prepared.body)
                progress.live = progress.unanswered > 0
            except (httpx.TransportError, DocumentError) as exc:
                if in_flight >= 0:
                    gate.leave(None, in_flight)  # type: ignore[union-attr]
                document = document_error_in(exc)
                if document is not None:
                    # A document failed mid-upload: the body was cut short of its Content-Length, so the
                    # provider cannot act on it. Terminal: set aside; a store hiccup: retried.
                    progress.sent -= 1
                    progress.live = progress.unanswered > 0
                    if probe and self.breaker is not None:
                        self.breaker.abort_probe()
                    if not document.retriable:
                        raise document from None
                    last = ProviderRetriableError(f"the document store failed ({document})")
                elif isinstance(exc, self._not_sent):
                    progress.sent -= 1  # never connected: nothing reached the provider
                    progress.live = progress.unanswered > 0
                else:
                    progress.unanswered += 1
                    reached = True
                    timed_out = isinstance(exc, httpx.TimeoutException)
                if document is None:
                    last = ProviderRetriableError(f"{type(exc).__name__} talking to the provider")
                    self._record(False, probe)
                    if self.on_attempt is not None:
                        self.on_attempt(None, time.perf_counter() - started)
            except BaseException:
                if in_flight >= 0:
                    gate.leave(None, in_flight)  # type: ignore[union-attr]
                if probe and self.breaker is not None:
                    self.breaker.abort_probe()
                raise
            else:
                answered = response.status_code
                kind = classify_status(answered)
                elapsed = time.perf_counter() - started
                # 429, or 503 with Retry-After: "too much", refused before any work (it also shrinks the
                # concurrency limit at once). Other retriable answers (5xx, 408/409/425) may come after the
                # provider acted, and say nothing about load here: no RTT sample (the breaker sees them).
                overload = answered == 429 or (answered == 503 and "retry-after" in response.headers)
                # With an adaptive limit an overload answer is the controller's signal, not a fault: a
                # provider that is alive and asks us to slow down must not open the breaker (a 5-s stop of
                # every call) when the limit already shrank for it.
                shrunk = overload and gate is not None and gate.adaptive
                self._record(kind != "retry" or shrunk, probe)
                if in_flight >= 0:
                    gate.leave(elapsed, in_flight, overload=overload, sample=kind != "retry")  # type: ignore[union-attr]
                if self.on_attempt is not None:
                    self.on_attempt(answered, elapsed)
                answer = read_answer(self.adapter, operation, response, kind, attempt, self.on_replay)
                if isinstance(answer, CallResult):
                    return answer
                reached = reached or not overload
                last = answer
            if attempt == self.retry.max_attempts:
                break
            assert last is not None
            delay = self._delay(attempt, last)
            if reconcile is not None and timed_out:
                # A lookup right after our deadline can miss a request the provider is still working on
                # (and then the resend acts twice). Give it one more deadline to finish first.
                delay = max(delay, self.timeout_s)
                timed_out = False
            log.info("provider attempt %d failed (%s); retrying in %.2fs", attempt, last, delay)
            await self._wait(delay, keep_alive, every)
        assert last is not None
        raise RetriesExhausted(self.retry.max_attempts, last)


def read_answer(
    adapter: ProviderAdapter,
    operation: Operation,
    response: httpx.Response,
    kind: str,
    attempt: int,
    on_replay: Callable[[], None] | None = None,
) -> CallResult | ProviderRetriableError:
    """What one answer (classified ``kind`` by :func:`classify_status`) means for the call: its result (an
    outcome, terminal or not), a retriable failure to retry, or raises :class:`ProviderAuthError`,
    :class:`ProviderConfigError` (a rejected key, a missing route) or :class:`ProviderInDoubt` (the key
    was used for a different request)."""
    answered = response.status_code
    if kind == "ok":
        if response.headers.get("idempotent-replayed", "").lower() == "true":
            log.info("provider answer replayed from its idempotency cache", extra={"replayed": True})
            if on_replay is not None:
                on_replay()
        outcome = adapter.read(operation, answered, response.content)
        # A 2xx whose status no documentation lists is recorded FAILED (unknown_status).
        return CallResult(outcome, terminal_failure=outcome.status == "failed", attempts=attempt)
    if kind == "auth":
        raise ProviderAuthError(answered)
    if kind == "config" or (answered == 404 and route_missing(response)):
        raise ProviderConfigError(answered, operation.path)
    code = error_code(response) if 400 <= answered < 500 else ""
    if code in KEY_REUSED_CODES:
        raise ProviderInDoubt(answered, code, attempt)
    if kind == "terminal":
        outcome = adapter.read(operation, answered, response.content)
        return CallResult(outcome, terminal_failure=True, attempts=attempt)
    return ProviderRetriableError(
        f"provider answered HTTP {answered}",
        status=answered,
        retry_after=parse_retry_after(response.headers.get("retry-after")),
    )


async def keeping_alive(wait: Callable[[], Awaitable[T]], keep_alive: Hook | None, every: float) -> T:
    """``await wait()``, calling ``keep_alive()`` (the lease's renewal) every ``every`` seconds meanwhile:
    a wait not over by then is cancelled, kept alive, and started again."""
    if keep_alive is None:
        return await wait()
    while True:
        with anyio.move_on_after(every):
            return await wait()
        await keep_alive()
