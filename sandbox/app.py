"""Request pipeline of the sandbox, independent of the transport.

A request on a business endpoint passes, in order (as at Stripe or Persona):

1. authentication (``x-api-key``): 403 for out-of-credit keys, 401 for unknown ones;
2. the per-key rate limit: 429 with ``Retry-After``;
3. injected gateway faults (``faults``): 5xx/429 answered here, nothing stored;
4. the idempotency layer (``idempotency``, run by ``ietf``): 400, 409, 422 or a replay;
5. business handling (``provider``), whose response is stored under the key.

The ``didit`` profile (``didit``) replaces steps 4-5 with Didit's own rules; ``admin`` serves ``/_admin``.

Steps 1-3 never touch the idempotency store, so a client may retry them with the same key and
still get the request processed once. Every request is recorded in the ledger with the step it
ended at.
"""

from __future__ import annotations

import asyncio
import logging

from . import admin
from .config import SandboxConfig, api_key_id
from .didit import DiditApi
from .faults import Fault, FaultAction, FaultInjector
from .idempotency import IdempotencyStore
from .ietf import IetfApi
from .ledger import Attempt, Ledger, Outcome
from .messages import Admitted, Drop, Request, Response
from .ratelimit import RateLimiter
from .responses import error, json_response, method_not_allowed, retry_after

__all__ = ["Drop", "Request", "Response", "SandboxApp", "json_response"]

log = logging.getLogger(__name__)

# Fixed answers are serialised once: they are the same bytes every time.
_NOT_FOUND = error(404, "not_found")
_UNAUTHORIZED = error(401, "unauthorized")
_OUT_OF_CREDIT = error(403, "insufficient_credits")


class SandboxApp:
    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.ledger = Ledger()
        self.faults = FaultInjector(config.faults)
        self.idempotency = IdempotencyStore(config.idempotency_ttl_s, config.clock)
        self.ietf = IetfApi(self)
        self.limiter = (
            RateLimiter(config.rate_limit_per_min, config.clock, config.rate_limit_burst)
            if config.rate_limit_per_min is not None
            else None
        )
        self._clock = config.clock
        self._api_keys = {key.encode(): api_key_id(key) for key in config.api_keys}
        self._out_of_credit = {key.encode(): api_key_id(key) for key in config.out_of_credit_keys}
        self.didit = DiditApi(self) if config.profile == "didit" else None
        self.base_url = f"http://{config.host}:{config.port}"
        """Fallback for session URLs when a request has no ``Host`` header; set by the server."""

    def reset(self) -> None:
        self.ledger.clear()
        self.idempotency.clear()
        self.faults.reset()
        self.ietf.reset()
        if self.didit is not None:
            self.didit.reset()
        if self.limiter is not None:
            self.limiter.clear()

    async def aclose(self) -> None:
        """Stop background work (the ``didit`` applicant and webhook sender); the server calls it."""
        if self.didit is not None:
            await self.didit.aclose()

    def totals(self) -> dict[str, object]:
        totals = self.ledger.totals()
        totals["in_flight"] = self.idempotency.in_flight
        return totals

    def snapshot(self) -> dict[str, object]:
        snapshot = self.ledger.snapshot()
        snapshot["totals"] = self.totals()
        if self.didit is not None:
            snapshot["profile"] = "didit"
            snapshot["effects"] = [e.to_dict() for e in self.ledger.effects()]
        return snapshot

    async def handle(self, request: Request) -> Response | Drop:
        path = request.target.partition(b"?")[0].decode("latin-1")
        route = path.rstrip("/") or "/"
        if self.didit is not None and route.startswith("/v3/"):
            return await self.didit.handle(request, path, route)
        answer = await self.ietf.handle(request, path, route)
        if answer is not None:
            return answer
        if route == "/healthz":
            if request.method != b"GET":
                return method_not_allowed("GET")
            return json_response(200, {"status": "ok"})
        if route == "/_admin" or route.startswith("/_admin/"):
            return admin.route(self, request, route, path)
        return _NOT_FOUND

    def new_attempt(self, request: Request, path: str, idempotency_key: str | None) -> Attempt:
        """The ledger's record of one business request, stamped now; the transport stamps its end."""
        attempt = Attempt(
            at=self._clock(),
            path=path,
            status=None,
            replayed=False,
            fault=None,
            idempotency_key=idempotency_key,
            api_key_id=None,
            side_effect=False,
            delivered=True,
        )
        request.meta["attempt"] = attempt
        return attempt

    def admit(
        self, request: Request, attempt: Attempt, ledger_key: str | None, *, roll_faults: bool = True
    ) -> Admitted | Response | Drop:
        """Steps 1-3 of the pipeline (auth, rate limit, gateway faults), shared by every profile.

        Returns :class:`Admitted` when business handling may run, else the answer (already recorded).
        """
        api_key = request.header(b"x-api-key", last=True)  # the last one, as before the split
        if api_key is not None and api_key in self._out_of_credit:
            attempt.api_key_id = self._out_of_credit[api_key]
            return self._finish(ledger_key, attempt, Outcome.OUT_OF_CREDIT, _OUT_OF_CREDIT)
        scope = self._api_keys.get(api_key) if api_key is not None else None
        if scope is None:
            return self._finish(ledger_key, attempt, Outcome.UNAUTHORIZED, _UNAUTHORIZED)
        attempt.api_key_id = scope

        if self.limiter is not None:
            wait_s = self.limiter.acquire(scope)
            if wait_s > 0:
                limited = error(429, "rate_limited", retry_after(wait_s))
                return self._finish(ledger_key, attempt, Outcome.RATE_LIMITED, limited)

        fault = self.faults.next_fault() if roll_faults else None
        if fault is not None:
            attempt.fault = fault.kind
            if fault.action is FaultAction.TRICKLE:
                request.meta["trickle_s"] = fault.delay_s
            if fault.action is FaultAction.RESPOND:
                return self._finish(ledger_key, attempt, Outcome.GATEWAY_FAULT, self._fault_response(fault))
            if fault.action is FaultAction.DROP_BEFORE:
                attempt.delivered = False
                self.ledger.record(ledger_key, attempt, Outcome.DROPPED_BEFORE)
                return Drop.DROP
        return Admitted(scope, fault)

    async def delay(self, fault: Fault | None) -> None:
        """The configured latency plus a ``delay:MS`` fault, before business handling."""
        delay_s = self.faults.latency_s()
        if fault is not None and fault.action is FaultAction.DELAY:
            delay_s += fault.delay_s
        if delay_s > 0:
            await asyncio.sleep(delay_s)

    def conclude(
        self, key: str | None, attempt: Attempt, outcome: Outcome, response: Response, fault: Fault | None
    ) -> Response | Drop:
        """Record the attempt; a ``drop`` fault closes the connection instead of answering."""
        if fault is not None and fault.action is FaultAction.DROP_AFTER:
            attempt.status = response.status
            attempt.delivered = False
            self.ledger.record(key, attempt, outcome)
            return Drop.DROP
        return self._finish(key, attempt, outcome, response)

    def _fault_response(self, fault: Fault) -> Response:
        if fault.status == 429:
            wait_s = fault.retry_after_s or self.faults.default_retry_after_s()
            return error(429, "rate_limited", retry_after(wait_s))
        if 300 <= fault.status < 400:
            return json_response(fault.status, {}, ((b"location", b"https://moved.invalid/"),))
        return error(fault.status, "injected")

    def _finish(self, key: str | None, attempt: Attempt, outcome: Outcome, response: Response) -> Response:
        attempt.status = response.status
        self.ledger.record(key, attempt, outcome)
        return response
