"""HTTP client for the identity-verification provider (Didit-style v3 API).

Every attempt of one request carries the same ``Idempotency-Key``: it is derived once from the message
ID (see :mod:`consumer.keys`) and never regenerated, so a retry after a lost answer is recognised by the
provider's server-side idempotency and answered from its stored response instead of being performed
again.

How answers are classified (terminal, retriable, configuration, in doubt) is :mod:`consumer.answers`.

Every attempt has a hard total deadline (``timeout_s``): httpx's timeouts are per phase (a provider that
trickles its answer a byte at a time never trips a read timeout), so the whole attempt runs under
``anyio.fail_after``, or, on :mod:`consumer.http`'s transport, aiohttp's own total timeout. The lease
is sized against this deadline (``IDV_LEASE_S ≥ IDV_PROVIDER_TIMEOUT_S + LEASE_SLACK_S``), and the body
sent is the canonical request (sorted keys, :func:`producer.envelope.canonical_request`), the same bytes
the fingerprint covers.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

import anyio
import httpx
import orjson

from consumer.answers import (
    KEY_REUSED_CODES,
    classify_status,
    decision,
    error_code,
    parse_retry_after,
    route_missing,
)
from consumer.breaker import BreakerState, CircuitBreaker
from consumer.concurrency import AdaptiveLimit, FixedLimit, ProviderGate, TokenBucket
from consumer.errors import (
    ConfigurationError,
    ProviderAuthError,
    ProviderConfigError,
    ProviderInDoubt,
    ProviderRetriableError,
    RetriesExhausted,
)
from consumer.model import Outcome
from producer.envelope import Operation

if TYPE_CHECKING:
    from consumer.settings import Settings

log = logging.getLogger(__name__)

__all__ = [
    "TRANSPORT_KINDS",
    "CallProgress",
    "CallResult",
    "ProviderClient",
    "RetryPolicy",
    "classify_status",
    "parse_retry_after",
    "make_transport",
]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 6
    base_delay_s: float = 0.2
    max_delay_s: float = 10.0

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Delay before attempt ``attempt + 1``: exponential with "equal jitter" (half fixed, half random)."""
        ceiling = min(self.max_delay_s, self.base_delay_s * 2.0 ** (attempt - 1))
        return ceiling / 2 + rng.uniform(0, ceiling / 2)


@dataclass(slots=True)
class CallProgress:
    """What a call did so far, for the caller deciding whether a key may be released.

    ``live`` is True while a request may have reached the provider without a complete answer back (sent,
    then a timeout, a dropped connection or a cancellation): the provider may still be working on it, so
    the key must not be handed to another owner before its lease expires."""

    sent: int = 0
    live: bool = False
    unanswered: int = 0  # requests sent that never got a complete answer (they may still be running)


@dataclass(frozen=True, slots=True)
class CallResult:
    outcome: Outcome
    terminal_failure: bool
    attempts: int


TRANSPORT_KINDS = ("httpx", "aiohttp", "httpx-aiohttp")


def make_transport(kind: str, limits: httpx.Limits) -> httpx.AsyncBaseTransport:
    """The transport for ``transport_kind``: ``"httpx"`` is httpx's own (httpcore) connection pool.

    ``"aiohttp"`` (:mod:`consumer.http`) keeps the httpx API (requests, responses, timeouts,
    ``httpx.TransportError`` on connection failures, so retries are classified exactly as before) on an
    aiohttp connection pool: httpcore's pool scans every connection on every request and degrades past
    ~16 concurrent requests on one client (httpx #3215, httpcore #924); see docs/performance.md.
    """
    if kind == "httpx":
        return httpx.AsyncHTTPTransport(limits=limits)
    if kind == "aiohttp":
        from consumer.http import AiohttpTransport

        assert limits.max_connections is not None
        return AiohttpTransport(max_connections=limits.max_connections)
    if kind == "httpx-aiohttp":
        try:
            from httpx_aiohttp import AiohttpTransport as PackagedTransport
        except ImportError:
            raise ConfigurationError(
                "provider transport 'httpx-aiohttp' needs pip install httpx-aiohttp"
            ) from None
        transport: httpx.AsyncBaseTransport = PackagedTransport(limits=limits)
        return transport
    raise ConfigurationError(
        f"unknown provider transport {kind!r} (use one of: {', '.join(TRANSPORT_KINDS)})"
    )


def gate_from_settings(settings: Settings) -> ProviderGate:
    """``IDV_CONCURRENCY`` (adaptive between ``IDV_CONCURRENCY_MIN`` and ``IDV_MAX_IN_FLIGHT``, or
    fixed at ``IDV_MAX_IN_FLIGHT``) and ``IDV_PROVIDER_RATE_LIMIT`` / ``_BURST`` (0 = no rate limit)."""
    ceiling = settings.max_in_flight
    controller: AdaptiveLimit | FixedLimit
    if settings.concurrency == "fixed":
        controller = FixedLimit(ceiling)
    else:
        controller = AdaptiveLimit(floor=min(settings.concurrency_min, ceiling), ceiling=ceiling)
    bucket = None
    if settings.provider_rate_limit > 0:
        burst = settings.provider_rate_burst or max(1.0, settings.provider_rate_limit / 10)
        bucket = TokenBucket(settings.provider_rate_limit, burst)
    return ProviderGate(controller, bucket)


class ProviderClient:
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
    ) -> None:
        self.breaker = breaker
        # Concurrency limit and client-side rate limit of attempts (consumer/concurrency.py); None = none.
        self.gate = gate
        self.timeout_s = timeout_s
        # A gateway answering Retry-After: 86400 must not park a partition for a day.
        self.retry_after_max_s = retry_after_max_s
        # Called after every attempt with (HTTP status or None for a transport error, seconds): metrics.
        self.on_attempt = on_attempt
        # Called for a success answer carrying Idempotent-Replayed: true (the provider had already acted on
        # this key and answered from its cache: an earlier attempt reached it): metrics.
        self.on_replay = on_replay
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        if transport is not None and transport_kind != "httpx":
            raise ValueError("pass either transport or transport_kind, not both")
        # An explicit transport (tests: httpx.MockTransport) is used as given; else transport_kind picks one.
        self.transport_kind = transport_kind
        if transport is None:
            transport = make_transport(transport_kind, limits)
        # Requests go straight to the transport (httpx's public transport API) rather than through an
        # httpx.AsyncClient: the client's per-request URL merging, cookie jar (urllib's cookiejar on every
        # answer), auth and redirect machinery cost ~40 % of the daemon's HTTP CPU and none of it is
        # wanted here (one fixed host, header auth, no redirects, no cookies).
        self._transport = transport
        # consumer.http's aiohttp transport enforces the total deadline itself (aiohttp's total timeout);
        # the others get an anyio.fail_after around the whole exchange (httpx's timeouts are per phase).
        self._deadline_outside = not getattr(transport, "enforces_total_deadline", False)
        # httpx-aiohttp reports a connection closed after the request arrived as ConnectTimeout (PITFALLS):
        # there a "connect" failure does not prove that nothing reached the provider.
        self._not_sent = (
            (httpx.ConnectError, httpx.PoolTimeout)
            if transport_kind == "httpx-aiohttp"
            else (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
        )
        # Per phase for httpx; "total" is read by consumer.http's aiohttp transport.
        self._timeout = {**httpx.Timeout(timeout_s).as_dict(), "total": timeout_s}
        self._urls: dict[str, httpx.URL] = {}
        self._base_headers = (
            (b"user-agent", b"idv-exactly-once/0.1"),
            (b"content-type", b"application/json"),
            (b"x-api-key", api_key.encode()),
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._transport.aclose()

    def _url(self, path: str) -> httpx.URL:
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self.base_url + path)
        return url

    async def _post(self, path: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> httpx.Response:
        request = httpx.Request(
            "POST", self._url(path), headers=headers, content=body, extensions={"timeout": self._timeout}
        )
        if not self._deadline_outside:
            return await self._exchange(request)
        try:
            with anyio.fail_after(self.timeout_s):
                return await self._exchange(request)
        except TimeoutError:
            raise httpx.ReadTimeout(
                f"no complete answer within the attempt deadline ({self.timeout_s:g}s)", request=request
            ) from None

    async def _exchange(self, request: httpx.Request) -> httpx.Response:
        response = await self._transport.handle_async_request(request)
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        on_breaker_change: Callable[[BreakerState], None] | None = None,
        on_attempt: Callable[[int | None, float], None] | None = None,
        on_replay: Callable[[], None] | None = None,
    ) -> ProviderClient:
        """The client the daemon and the replay tool use: settings' timeouts, retries, pool and breaker."""
        breaker = CircuitBreaker(
            failure_ratio=settings.breaker_failure_ratio,
            min_calls=settings.breaker_min_calls,
            window=max(settings.breaker_min_calls, 20),
            open_s=settings.breaker_open_s,
            on_change=on_breaker_change,
        )
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
            breaker=breaker,
            on_attempt=on_attempt,
            transport_kind=settings.provider_transport,
            retry_after_max_s=settings.provider_retry_after_max_s,
            gate=gate_from_settings(settings),
            on_replay=on_replay,
        )

    async def _acquire(self, keep_alive: Callable[[], Awaitable[None]] | None, every: float) -> bool:
        assert self.breaker is not None
        if keep_alive is None:
            return await self.breaker.acquire()
        while True:
            with anyio.move_on_after(every):
                return await self.breaker.acquire()
            await keep_alive()

    async def _wait(
        self, delay: float, keep_alive: Callable[[], Awaitable[None]] | None, every: float
    ) -> None:
        while True:
            step = delay if keep_alive is None else min(delay, every)
            await self._sleep(step)
            delay -= step
            if delay <= 0 or keep_alive is None:
                return
            await keep_alive()

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
        keep_alive: Callable[[], Awaitable[None]] | None = None,
        keep_alive_every_s: float = 20.0,
    ) -> CallResult:
        """POST ``request`` to the operation's endpoint, retrying retriable failures with the same key.

        ``request`` is sent as given when it is bytes (the pipeline passes the canonical request), else
        encoded with sorted keys. ``before_attempt(n)`` runs before each attempt, after any wait in the
        circuit breaker (the pipeline makes sure of its lease there). ``keep_alive()`` runs every
        ``keep_alive_every_s`` while the call waits between attempts: in an open circuit breaker, in
        backoff, behind a ``Retry-After`` (the pipeline renews its lease). An attempt itself needs none: it
        is bounded by the deadline, which the lease covers. ``progress`` is kept up to date.
        Raises :class:`ProviderAuthError` (or its :class:`ProviderConfigError`), :class:`ProviderInDoubt`
        or :class:`RetriesExhausted`.
        """
        body = request if isinstance(request, bytes) else orjson.dumps(request, option=orjson.OPT_SORT_KEYS)
        progress = progress if progress is not None else CallProgress()
        headers = [*self._base_headers, (b"idempotency-key", idempotency_key.encode())]
        last: ProviderRetriableError | None = None
        for attempt in range(1, self.retry.max_attempts + 1):
            probe = False
            if self.breaker is not None and self.breaker.state is not BreakerState.CLOSED:
                # While the breaker is open the attempt waits here without spending the retry budget.
                probe = await self._acquire(keep_alive, keep_alive_every_s)
            started = time.perf_counter()
            gate = self.gate
            in_flight = -1  # >= 0 once this attempt holds a slot of the gate
            try:
                if gate is not None:
                    # The rate limit's token, then a concurrency slot (FIFO across partitions).
                    in_flight = await gate.enter(self._sleep, keep_alive, keep_alive_every_s)
                if before_attempt is not None:
                    await before_attempt(attempt)
                started = time.perf_counter()
                progress.sent += 1
                progress.live = True
                response = await self._post(operation.path, body, headers)
                progress.live = progress.unanswered > 0
            except httpx.TransportError as exc:
                if in_flight >= 0:
                    gate.leave(None, in_flight)  # type: ignore[union-attr]
                if isinstance(exc, self._not_sent):
                    progress.sent -= 1  # never connected: nothing reached the provider
                    progress.live = progress.unanswered > 0
                else:
                    progress.unanswered += 1
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
                kind = classify_status(response.status_code)
                self._record(kind != "retry", probe)
                elapsed = time.perf_counter() - started
                if in_flight >= 0:
                    answered = response.status_code
                    # 429, or 503 with Retry-After: "too much" - shrink at once. Other retriable answers
                    # (5xx, 408/409/425) say nothing about load here: no RTT sample (the breaker sees them).
                    overload = answered == 429 or (answered == 503 and "retry-after" in response.headers)
                    gate.leave(elapsed, in_flight, overload=overload, sample=kind != "retry")  # type: ignore[union-attr]
                if self.on_attempt is not None:
                    self.on_attempt(response.status_code, elapsed)
                if kind == "ok":
                    if response.headers.get("idempotent-replayed", "").lower() == "true":
                        log.info(
                            "provider answer replayed from its idempotency cache", extra={"replayed": True}
                        )
                        if self.on_replay is not None:
                            self.on_replay()
                    try:
                        parsed = orjson.loads(response.content)
                    except orjson.JSONDecodeError:
                        parsed = None
                    status, reference = decision(operation, parsed)
                    outcome = Outcome(status, response.status_code, reference)
                    return CallResult(outcome, terminal_failure=False, attempts=attempt)
                if kind == "auth":
                    raise ProviderAuthError(response.status_code)
                if kind == "config" or (response.status_code == 404 and route_missing(response)):
                    raise ProviderConfigError(response.status_code, operation.path)
                code = error_code(response) if 400 <= response.status_code < 500 else ""
                if code in KEY_REUSED_CODES:
                    raise ProviderInDoubt(response.status_code, code, attempt)
                if kind == "terminal":
                    outcome = Outcome("failed", response.status_code, None, code or error_code(response))
                    return CallResult(outcome, terminal_failure=True, attempts=attempt)
                last = ProviderRetriableError(
                    f"provider answered HTTP {response.status_code}",
                    status=response.status_code,
                    retry_after=parse_retry_after(response.headers.get("retry-after")),
                )
            if attempt == self.retry.max_attempts:
                break
            delay = self.retry.backoff(attempt, self._rng)
            if last.retry_after is not None:
                # Retry-After is the provider's minimum; jittered backoff may only lengthen it. Capped: a
                # message waits here holding its partition's commit, so a day-long hint is not obeyed.
                delay = max(delay, min(last.retry_after, self.retry_after_max_s))
            log.info(
                "provider attempt %d failed (%s); retrying in %.2fs",
                attempt,
                last,
                delay,
            )
            await self._wait(delay, keep_alive, keep_alive_every_s)
        assert last is not None
        raise RetriesExhausted(self.retry.max_attempts, last)
