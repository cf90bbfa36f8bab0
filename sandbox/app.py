"""Request pipeline of the sandbox, independent of the transport.

A request on a business endpoint passes, in order (as at Stripe or Persona):

1. authentication (``x-api-key``): 403 for out-of-credit keys, 401 for unknown ones;
2. the per-key rate limit: 429 with ``Retry-After``;
3. injected gateway faults (``faults``): 5xx/429 answered here, nothing stored;
4. the idempotency layer (``idempotency``): 400, 409, 422 or a replay;
5. business handling (``provider``), whose response is stored under the key.

Steps 1-3 never touch the idempotency store, so a client may retry them with the same key and
still get the request processed once. Every request is recorded in the ledger with the step it
ended at.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import parse_qs, unquote

import orjson

from .config import SandboxConfig, api_key_id
from .didit import DiditApi
from .errors import SandboxConfigError
from .faults import Fault, FaultAction, FaultInjector
from .idempotency import (
    MAX_KEY_LENGTH,
    Claimed,
    IdempotencyStore,
    InFlight,
    Mismatch,
    StoredResponse,
    fingerprint,
    parse_key,
)
from .ledger import Attempt, Effect, Ledger, Outcome
from .messages import Admitted, Drop, Request, Response
from .provider import Endpoint, Provider
from .ratelimit import RateLimiter
from .responses import error, json_response, method_not_allowed, retry_after

__all__ = ["Drop", "Request", "Response", "SandboxApp", "json_response"]

log = logging.getLogger(__name__)

_REPLAYED = (b"idempotent-replayed", b"true")
_ENDPOINTS = {endpoint.value.rstrip("/"): endpoint for endpoint in Endpoint}
_error = error
_retry_after = retry_after
_method_not_allowed = method_not_allowed


# Fixed answers are serialised once: they are the same bytes every time.
_NOT_FOUND = _error(404, "not_found")
_UNAUTHORIZED = _error(401, "unauthorized")
_OUT_OF_CREDIT = _error(403, "insufficient_credits")
_FORBIDDEN = _error(403, "forbidden")
_KEY_MISSING = _error(400, "idempotency_key_missing")
_KEY_TOO_LONG = json_response(
    400, {"error": "idempotency_key_invalid", "detail": f"longer than {MAX_KEY_LENGTH} characters"}
)
_IN_FLIGHT = _error(409, "idempotency_request_in_flight", _retry_after(1))
_KEY_REUSED = _error(422, "idempotency_key_reused")
_INTERNAL = _error(500, "internal")


class SandboxApp:
    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.ledger = Ledger()
        self.faults = FaultInjector(config.faults)
        self.idempotency = IdempotencyStore(config.idempotency_ttl_s, config.clock)
        self.provider = Provider()
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
        self.provider.reset()
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

    def effects(self, query: str) -> dict[str, object]:
        """``GET /_admin/effects[?idv_key=&operation=&vendor_data=]``: side effects, counts per key."""
        params = {name: values[0] for name, values in parse_qs(query).items() if values}
        effects = self.ledger.effects(
            idv_key=params.get("idv_key"),
            operation=params.get("operation"),
            vendor_data=params.get("vendor_data"),
        )
        per_key: dict[str, int] = {}
        for effect in effects:
            if effect.idv_key is not None:
                per_key[effect.idv_key] = per_key.get(effect.idv_key, 0) + 1
        return {
            "profile": self.config.profile,
            "count": len(effects),
            "per_idv_key": per_key,
            "effects": [e.to_dict() for e in effects],
        }

    async def handle(self, request: Request) -> Response | Drop:
        path = request.target.partition(b"?")[0].decode("latin-1")
        route = path.rstrip("/") or "/"
        if self.didit is not None and route.startswith("/v3/"):
            return await self.didit.handle(request, path, route)
        endpoint = _ENDPOINTS.get(route)
        if endpoint is not None:
            if request.method != b"POST":
                return _method_not_allowed("POST")
            return await self._business(endpoint, path, request)
        if route == "/healthz":
            if request.method != b"GET":
                return _method_not_allowed("GET")
            return json_response(200, {"status": "ok"})
        if route == "/_admin" or route.startswith("/_admin/"):
            return self._admin(request, route, path)
        return _NOT_FOUND

    # -- business endpoints -------------------------------------------------------------------

    async def _business(self, endpoint: Endpoint, path: str, request: Request) -> Response | Drop:
        raw_key = host = None
        for name, value in request.headers:
            if name == b"idempotency-key":
                raw_key = value
            elif name == b"host":
                host = value
        key = parse_key(raw_key) if raw_key is not None else None
        key_ok = key is not None and len(key) <= MAX_KEY_LENGTH
        attempt = self.new_attempt(request, path, raw_key.decode("latin-1") if raw_key is not None else None)
        ledger_key = key if key_ok else None
        admitted = self.admit(request, attempt, ledger_key)
        if not isinstance(admitted, Admitted):
            return admitted
        scope, fault = admitted.scope, admitted.fault

        if key is None:
            outcome, response = Outcome.MISSING_KEY, _KEY_MISSING
        elif not key_ok:
            outcome, response = Outcome.INVALID_KEY, _KEY_TOO_LONG
        else:
            claim = self.idempotency.begin(scope, key, fingerprint(b"POST", endpoint.value, request.body))
            if isinstance(claim, Claimed):
                processed = await self._process(claim, endpoint, request.body, host, fault)
                if processed is None:
                    outcome, response = Outcome.INTERNAL_ERROR, _INTERNAL
                else:
                    outcome, (response, effect) = Outcome.PROCESSED, processed
                    if effect is not None:
                        attempt.side_effect = True
                        self.ledger.record_effect(
                            Effect(
                                at=attempt.at,
                                profile="ietf",
                                operation=effect[0],
                                vendor_data=effect[1],
                                idv_key=effect[2],
                                reference=effect[3],
                                api_key_id=attempt.api_key_id,
                            )
                        )
            elif isinstance(claim, InFlight):
                outcome, response = Outcome.IN_FLIGHT, _IN_FLIGHT
            elif isinstance(claim, Mismatch):
                outcome, response = Outcome.KEY_REUSED, _KEY_REUSED
            else:
                outcome = Outcome.REPLAYED
                stored = claim.response
                response = StoredResponse(stored.status, (*stored.headers, _REPLAYED), stored.body)
                attempt.replayed = True
        return self.conclude(ledger_key, attempt, outcome, response, fault)

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
        api_key = None
        for name, value in request.headers:
            if name == b"x-api-key":
                api_key = value
                break
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
                limited = _error(429, "rate_limited", _retry_after(wait_s))
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

    async def _process(
        self, claim: Claimed, endpoint: Endpoint, body: bytes, host: bytes | None, fault: Fault | None
    ) -> tuple[Response, tuple[str, str | None, str | None, str] | None] | None:
        """Run business handling under a claimed key: ``(response, effect)``, ``None`` on a bug; ``effect`` is
        ``(operation, vendor_data, idv_key, reference)`` when one was performed."""
        try:
            await self.delay(fault)
            base_url = f"http://{host.decode('latin-1')}" if host else self.base_url
            result = self.provider.handle(endpoint, body, base_url)
        except Exception:
            self.idempotency.release(claim)
            log.exception("business handling failed on %s", endpoint.value)
            return None
        except BaseException:
            # Cancelled (server stopping): nothing was stored, so a retry must be able to run.
            self.idempotency.release(claim)
            raise
        response = json_response(result.status, result.body)
        self.idempotency.complete(claim, response)
        return response, result.effect

    def _fault_response(self, fault: Fault) -> Response:
        if fault.status == 429:
            retry_after = fault.retry_after_s or self.faults.default_retry_after_s()
            return _error(429, "rate_limited", _retry_after(retry_after))
        if 300 <= fault.status < 400:
            return json_response(fault.status, {}, ((b"location", b"https://moved.invalid/"),))
        return _error(fault.status, "injected")

    def _finish(self, key: str | None, attempt: Attempt, outcome: Outcome, response: Response) -> Response:
        attempt.status = response.status
        self.ledger.record(key, attempt, outcome)
        return response

    # -- admin ----------------------------------------------------------------------------------

    def _admin(self, request: Request, route: str, path: str) -> Response:
        if not request.peer_is_loopback:
            return _FORBIDDEN
        method = request.method
        if route == "/_admin/ledger":
            if method != b"GET":
                return _method_not_allowed("GET")
            return json_response(200, self.snapshot())
        if path.startswith("/_admin/ledger/") and len(path) > len("/_admin/ledger/"):
            if method != b"GET":
                return _method_not_allowed("GET")
            key = unquote(path[len("/_admin/ledger/") :])
            record = self.ledger.get(key)
            if record is None:
                return _error(404, "unknown_key")
            return json_response(200, {"key": key, **record.to_dict()})
        if route == "/_admin/stats":
            if method != b"GET":
                return _method_not_allowed("GET")
            return json_response(200, self.totals())
        if route == "/_admin/faults":
            if method == b"GET":
                return json_response(200, self.faults.config.to_dict())
            if method != b"POST":
                return _method_not_allowed("GET", "POST")
            return self._set_faults(request.body)
        if route == "/_admin/rate-limit":
            if method == b"GET":
                return json_response(200, self._rate_limit_state())
            if method != b"POST":
                return _method_not_allowed("GET", "POST")
            return self._set_rate_limit(request.body)
        if route == "/_admin/reset":
            if method != b"POST":
                return _method_not_allowed("POST")
            self.reset()
            log.info("sandbox state reset")
            return json_response(200, {"reset": True})
        if route == "/_admin/effects":
            if method != b"GET":
                return _method_not_allowed("GET")
            return json_response(200, self.effects(request.target.partition(b"?")[2].decode("latin-1")))
        if self.didit is not None:
            answer = self.didit.admin(request, route)
            if answer is not None:
                return answer
        return _NOT_FOUND

    def _rate_limit_state(self) -> dict[str, object]:
        if self.limiter is None:
            return {"per_minute": None, "per_second": None, "burst": None}
        return dict(self.limiter.to_dict())

    def _set_rate_limit(self, body: bytes) -> Response:
        """``{"per_second": 250}`` or ``{"per_minute": 15000, "burst": 250}``; ``per_minute: null`` turns the
        limit off. Takes effect for the next request (the buckets keep their tokens)."""
        try:
            changes = orjson.loads(body or b"{}")
        except orjson.JSONDecodeError:
            changes = None
        if not isinstance(changes, dict) or not set(changes) <= {"per_minute", "per_second", "burst"}:
            return json_response(
                400,
                {"error": "invalid_rate_limit", "detail": "a JSON object of per_minute|per_second, burst"},
            )
        per_minute = changes.get("per_minute")
        if changes.get("per_second") is not None:
            per_minute = changes["per_second"] * 60.0
        burst = changes.get("burst")
        if "per_minute" in changes and changes["per_minute"] is None and "per_second" not in changes:
            self.limiter = None
            log.info("rate limit off")
            return json_response(200, self._rate_limit_state())
        valid_rate = (
            isinstance(per_minute, int | float) and not isinstance(per_minute, bool) and per_minute > 0
        )
        valid_burst = burst is None or (isinstance(burst, int) and not isinstance(burst, bool) and burst >= 1)
        if not valid_rate or not valid_burst:
            return json_response(
                400, {"error": "invalid_rate_limit", "detail": "rate must be > 0, burst an integer >= 1"}
            )
        assert isinstance(per_minute, int | float)
        if self.limiter is None:
            self.limiter = RateLimiter(per_minute, self._clock, burst)
        else:
            self.limiter.configure(per_minute, burst)
        log.info("rate limit set to %g/min, burst %s", per_minute, burst)
        return json_response(200, self._rate_limit_state())

    def _set_faults(self, body: bytes) -> Response:
        try:
            changes = orjson.loads(body or b"{}")
        except orjson.JSONDecodeError:
            return json_response(400, {"error": "invalid_faults", "detail": "body is not JSON"})
        if not isinstance(changes, dict):
            return json_response(400, {"error": "invalid_faults", "detail": "body must be a JSON object"})
        try:
            config = self.faults.update(changes)
        except SandboxConfigError as exc:
            return json_response(400, {"error": "invalid_faults", "detail": str(exc)})
        log.info("fault configuration changed: %s", ", ".join(sorted(changes)))
        return json_response(200, config.to_dict())
