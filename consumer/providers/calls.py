"""Value types and builders of the provider client: retry policy, call progress and result, transports,
the concurrency gate. Kept apart from :mod:`consumer.provider` (the client itself), which re-exports them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx

from consumer.concurrency import AdaptiveLimit, FixedLimit, ProviderGate
from consumer.errors import ConfigurationError
from consumer.looplag import LoopLag
from consumer.model import Outcome
from consumer.pacing import TokenBucket

if TYPE_CHECKING:
    from consumer.settings import Settings

__all__ = [
    "TRANSPORT_KINDS",
    "CallProgress",
    "CallResult",
    "RetryPolicy",
    "gate_from_settings",
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
    # True when the outcome is an earlier attempt's, found by reconciliation (no call made for it).
    reconciled: bool = False


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


def gate_from_settings(settings: Settings, loop_lag: LoopLag | None = None) -> ProviderGate:
    """``IDV_CONCURRENCY`` (adaptive between ``IDV_CONCURRENCY_MIN`` and ``IDV_MAX_IN_FLIGHT``, or
    fixed at ``IDV_MAX_IN_FLIGHT``) and ``IDV_PROVIDER_RATE_LIMIT`` / ``_BURST`` (0 = no rate limit).
    ``loop_lag``: the daemon's event-loop lag, a signal for the adaptive controller (None: not used)."""
    ceiling = settings.max_in_flight
    controller: AdaptiveLimit | FixedLimit
    if settings.concurrency == "fixed":
        controller = FixedLimit(ceiling)
    else:
        floor = min(settings.concurrency_min, ceiling)
        controller = AdaptiveLimit(floor=floor, ceiling=ceiling, loop_lag=loop_lag)
    bucket = None
    if settings.provider_rate_limit > 0:
        burst = settings.provider_rate_burst or max(1.0, settings.provider_rate_limit / 10)
        bucket = TokenBucket(settings.provider_rate_limit, burst)
    return ProviderGate(controller, bucket)
