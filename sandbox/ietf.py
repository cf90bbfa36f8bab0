"""The ``ietf`` profile: the Idempotency-Key layer (steps 4-5 of ``app``) around business handling.

An attempt that passed ``SandboxApp.admit`` claims its ``(api key, Idempotency-Key)`` in the
``idempotency`` store with the request's fingerprint: 400 without a usable key, 409 while the first
request with the key is still running, 422 for the key reused with another payload, the stored answer
(``Idempotency-Replayed: true``) once it finished; else ``provider`` runs once and its answer is stored.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .faults import Fault
from .idempotency import MAX_KEY_LENGTH, Claimed, InFlight, Mismatch, StoredResponse, fingerprint, parse_key
from .ledger import Effect, Outcome
from .messages import Admitted, Drop, Request, Response
from .provider import Endpoint, Provider
from .responses import error, json_response, method_not_allowed, retry_after

if TYPE_CHECKING:
    from .app import SandboxApp

__all__ = ["IetfApi"]

log = logging.getLogger(__name__)

_ENDPOINTS = {endpoint.value.rstrip("/"): endpoint for endpoint in Endpoint}
_REPLAYED = (b"idempotent-replayed", b"true")
# Fixed answers are serialised once: they are the same bytes every time.
_KEY_MISSING = error(400, "idempotency_key_missing")
_KEY_TOO_LONG = json_response(
    400, {"error": "idempotency_key_invalid", "detail": f"longer than {MAX_KEY_LENGTH} characters"}
)
_IN_FLIGHT = error(409, "idempotency_request_in_flight", retry_after(1))
_KEY_REUSED = error(422, "idempotency_key_reused")
_INTERNAL = error(500, "internal")

_Effect = tuple[str, str | None, str | None, str]
"""``(operation, vendor_data, idv_key, reference)`` of a side effect, as ``provider.Result.effect``."""


class IetfApi:
    """Routes of the ``ietf`` profile's business endpoints; :attr:`provider` performs their side effects."""

    def __init__(self, app: SandboxApp) -> None:
        self.app = app
        self.provider = Provider()

    def reset(self) -> None:
        self.provider.reset()

    async def handle(self, request: Request, path: str, route: str) -> Response | Drop | None:
        """The answer for a business endpoint, ``None`` for a route that is not one."""
        endpoint = _ENDPOINTS.get(route)
        if endpoint is None:
            return None
        if request.method != b"POST":
            return method_not_allowed("POST")
        return await self._business(endpoint, path, request)

    async def _business(self, endpoint: Endpoint, path: str, request: Request) -> Response | Drop:
        app = self.app
        raw_key = request.header(b"idempotency-key", last=True)
        host = request.header(b"host", last=True)
        key = parse_key(raw_key) if raw_key is not None else None
        key_ok = key is not None and len(key) <= MAX_KEY_LENGTH
        attempt = app.new_attempt(request, path, raw_key.decode("latin-1") if raw_key is not None else None)
        ledger_key = key if key_ok else None
        admitted = app.admit(request, attempt, ledger_key)
        if not isinstance(admitted, Admitted):
            return admitted
        scope, fault = admitted.scope, admitted.fault

        if key is None:
            outcome, response = Outcome.MISSING_KEY, _KEY_MISSING
        elif not key_ok:
            outcome, response = Outcome.INVALID_KEY, _KEY_TOO_LONG
        else:
            claim = app.idempotency.begin(scope, key, fingerprint(b"POST", endpoint.value, request.body))
            if isinstance(claim, Claimed):
                processed = await self._process(claim, endpoint, request.body, host, fault)
                if processed is None:
                    outcome, response = Outcome.INTERNAL_ERROR, _INTERNAL
                else:
                    outcome, (response, effect) = Outcome.PROCESSED, processed
                    if effect is not None:
                        attempt.side_effect = True
                        operation, vendor_data, idv_key, reference = effect
                        app.ledger.record_effect(
                            Effect(
                                at=attempt.at,
                                profile="ietf",
                                operation=operation,
                                vendor_data=vendor_data,
                                idv_key=idv_key,
                                reference=reference,
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
        return app.conclude(ledger_key, attempt, outcome, response, fault)

    async def _process(
        self, claim: Claimed, endpoint: Endpoint, body: bytes, host: bytes | None, fault: Fault | None
    ) -> tuple[Response, _Effect | None] | None:
        """Run business handling under a claimed key: ``(response, effect)``, ``None`` on a bug."""
        store = self.app.idempotency
        try:
            await self.app.delay(fault)
            base_url = f"http://{host.decode('latin-1')}" if host else self.app.base_url
            result = self.provider.handle(endpoint, body, base_url)
        except Exception:
            store.release(claim)
            log.exception("business handling failed on %s", endpoint.value)
            return None
        except BaseException:
            # Cancelled (server stopping): nothing was stored, so a retry must be able to run.
            store.release(claim)
            raise
        response = json_response(result.status, result.body)
        store.complete(claim, response)
        return response, result.effect
