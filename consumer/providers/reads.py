"""The provider client's read-only requests: lookups of a reconciliation and ``get_decision``.

A mixin of :class:`consumer.provider.ProviderClient` (which provides the transport, the retry policy and
the waits); kept apart so that the client module stays about its mutating call. A GET changes nothing at
the provider, so it is retried freely (transport errors, 408/409/425/429, 5xx), with the lease made sure of
before each try when the caller holds one. Each try first takes a token of the client-side rate limit
(``IDV_PROVIDER_RATE_LIMIT``, the same bucket as the calls': the provider's limit counts every request);
a read holds no concurrency slot, but a 429 to it cuts the limit as one to a call would.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from urllib.parse import quote

import httpx

from consumer.answers import classify_status, error_code_of, parse_retry_after, route_missing
from consumer.concurrency import ProviderGate, Sleep
from consumer.errors import (
    ProviderAuthError,
    ProviderConfigError,
    ProviderNotFound,
    ProviderRetriableError,
    RetriesExhausted,
)
from consumer.model import Outcome
from consumer.providers.base import ProviderAdapter
from consumer.providers.calls import RetryPolicy
from consumer.providers.ietf import read_json_answer
from producer.envelope import get_operation

__all__ = ["Hook", "ReadCalls"]

Hook = Callable[[], Awaitable[None]]


class ReadCalls:
    adapter: ProviderAdapter
    retry: RetryPolicy
    retry_after_max_s: float
    _rng: random.Random
    _base_headers: tuple[tuple[bytes, bytes], ...]
    gate: ProviderGate | None
    _sleep: Sleep

    async def _send(
        self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> httpx.Response:
        raise NotImplementedError

    async def _wait(self, delay: float, keep_alive: Hook | None, every: float) -> None:
        raise NotImplementedError

    async def get_decision(self, session_id: str) -> Outcome:
        """``GET /v3/session/{session_id}/decision/`` (read-only, retried like any attempt): the session's
        current outcome. Raises :class:`ProviderNotFound` for an unknown session (404)."""
        path = f"/v3/session/{quote(session_id, safe='')}/decision/"
        status, body = await self._get(path, None, None, 20.0)
        if status == 404:
            raise ProviderNotFound("this session")
        if status >= 400:
            return Outcome("failed", status, None, error_code_of(status, body))
        reader = getattr(self.adapter, "read_decision", None)
        if reader is not None:
            outcome: Outcome = reader(body)[0]
            return outcome
        return read_json_answer(get_operation("create_session"), status, body)

    async def _get(
        self, path: str, ensure_lease: Hook | None, keep_alive: Hook | None, every: float
    ) -> tuple[int, bytes]:
        """One read-only GET, retried on transport errors, 408/409/425/429 and 5xx (with the lease made sure
        of before each try); (status, body) for any other answer. 401/403 and a missing route stop the
        daemon as for any call."""
        last: ProviderRetriableError | None = None
        for attempt in range(1, self.retry.max_attempts + 1):
            if ensure_lease is not None:
                await ensure_lease()
            if self.gate is not None:
                await self.gate.take_token(self._sleep, keep_alive, every)
            started = time.perf_counter()
            try:
                response = await self._send("GET", path, list(self._base_headers), b"")
            except httpx.TransportError as exc:
                last = ProviderRetriableError(f"{type(exc).__name__} talking to the provider")
            else:
                kind = classify_status(response.status_code)
                if kind == "auth":
                    raise ProviderAuthError(response.status_code)
                if kind == "config" or (response.status_code == 404 and route_missing(response)):
                    raise ProviderConfigError(response.status_code, path.split("?", 1)[0])
                if kind != "retry":
                    return response.status_code, response.content
                if self.gate is not None and response.status_code == 429:
                    self.gate.refused(time.perf_counter() - started)
                last = ProviderRetriableError(
                    f"provider answered HTTP {response.status_code}",
                    status=response.status_code,
                    retry_after=parse_retry_after(response.headers.get("retry-after")),
                )
            if attempt < self.retry.max_attempts:
                await self._wait(self._delay(attempt, last), keep_alive, every)
        assert last is not None
        raise RetriesExhausted(self.retry.max_attempts, last)

    def _delay(self, attempt: int, last: ProviderRetriableError) -> float:
        delay = self.retry.backoff(attempt, self._rng)
        if last.retry_after is not None:
            # Retry-After is the provider's minimum; jittered backoff may only lengthen it. Capped: a
            # message waits here holding its partition's commit, so a day-long hint is not obeyed.
            delay = max(delay, min(last.retry_after, self.retry_after_max_s))
        return delay
