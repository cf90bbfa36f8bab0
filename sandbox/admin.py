"""The ``/_admin`` routes every profile serves: ledger, stats, effects, faults, rate limit, reset.

Loopback peers only (403 otherwise). A profile's own admin routes (``didit_admin``) are asked last.

| route | what |
|---|---|
| ``GET /_admin/ledger`` | every key's record and the totals (with ``effects`` in the ``didit`` profile) |
| ``GET /_admin/ledger/<key>`` | one key's record |
| ``GET /_admin/stats`` | the totals |
| ``GET /_admin/effects[?idv_key=&operation=&vendor_data=]`` | side effects, with counts per ``idv_key`` |
| ``GET`` / ``POST /_admin/faults`` | the fault configuration / merge changes into it |
| ``GET`` / ``POST /_admin/rate-limit`` | the per-key rate limit / change it |
| ``POST /_admin/reset`` | forget everything |
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote

import orjson

from .errors import SandboxConfigError
from .messages import Request, Response
from .ratelimit import RateLimiter
from .responses import error, json_response, method_not_allowed

if TYPE_CHECKING:
    from .app import SandboxApp

__all__ = ["json_object", "route"]

log = logging.getLogger(__name__)

_NOT_FOUND = error(404, "not_found")
_FORBIDDEN = error(403, "forbidden")
_LEDGER = "/_admin/ledger/"


def json_object(raw: bytes) -> dict[str, Any] | None:
    """An admin request's body as a JSON object (an empty body is ``{}``); ``None`` when it is not one."""
    try:
        body = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


def route(app: SandboxApp, request: Request, route: str, path: str) -> Response:
    if not request.peer_is_loopback:
        return _FORBIDDEN
    method = request.method
    if route == "/_admin/ledger":
        if method != b"GET":
            return method_not_allowed("GET")
        return json_response(200, app.snapshot())
    if path.startswith(_LEDGER) and len(path) > len(_LEDGER):
        if method != b"GET":
            return method_not_allowed("GET")
        key = unquote(path[len(_LEDGER) :])
        record = app.ledger.get(key)
        if record is None:
            return error(404, "unknown_key")
        return json_response(200, {"key": key, **record.to_dict()})
    if route == "/_admin/stats":
        if method != b"GET":
            return method_not_allowed("GET")
        return json_response(200, app.totals())
    if route == "/_admin/faults":
        if method == b"GET":
            return json_response(200, app.faults.config.to_dict())
        if method != b"POST":
            return method_not_allowed("GET", "POST")
        return _set_faults(app, request.body)
    if route == "/_admin/rate-limit":
        if method == b"GET":
            return json_response(200, _rate_limit_state(app))
        if method != b"POST":
            return method_not_allowed("GET", "POST")
        return _set_rate_limit(app, request.body)
    if route == "/_admin/reset":
        if method != b"POST":
            return method_not_allowed("POST")
        app.reset()
        log.info("sandbox state reset")
        return json_response(200, {"reset": True})
    if route == "/_admin/effects":
        if method != b"GET":
            return method_not_allowed("GET")
        return json_response(200, _effects(app, request.target.partition(b"?")[2].decode("latin-1")))
    if app.didit is not None:
        answer = app.didit.admin(request, route)
        if answer is not None:
            return answer
    return _NOT_FOUND


def _effects(app: SandboxApp, query: str) -> dict[str, object]:
    params = {name: values[0] for name, values in parse_qs(query).items() if values}
    effects = app.ledger.effects(
        idv_key=params.get("idv_key"),
        operation=params.get("operation"),
        vendor_data=params.get("vendor_data"),
    )
    per_key: dict[str, int] = {}
    for effect in effects:
        if effect.idv_key is not None:
            per_key[effect.idv_key] = per_key.get(effect.idv_key, 0) + 1
    return {
        "profile": app.config.profile,
        "count": len(effects),
        "per_idv_key": per_key,
        "effects": [e.to_dict() for e in effects],
    }


def _rate_limit_state(app: SandboxApp) -> dict[str, object]:
    if app.limiter is None:
        return {"per_minute": None, "per_second": None, "burst": None}
    return dict(app.limiter.to_dict())


def _set_rate_limit(app: SandboxApp, body: bytes) -> Response:
    """``{"per_second": 250}`` or ``{"per_minute": 15000, "burst": 250}``; ``per_minute: null`` turns the
    limit off. Takes effect for the next request (the buckets keep their tokens)."""
    changes = json_object(body)
    if changes is None or not set(changes) <= {"per_minute", "per_second", "burst"}:
        return json_response(
            400,
            {"error": "invalid_rate_limit", "detail": "a JSON object of per_minute|per_second, burst"},
        )
    per_minute = changes.get("per_minute")
    if changes.get("per_second") is not None:
        per_minute = changes["per_second"] * 60.0
    burst = changes.get("burst")
    if "per_minute" in changes and changes["per_minute"] is None and "per_second" not in changes:
        app.limiter = None
        log.info("rate limit off")
        return json_response(200, _rate_limit_state(app))
    valid_rate = isinstance(per_minute, int | float) and not isinstance(per_minute, bool) and per_minute > 0
    valid_burst = burst is None or (isinstance(burst, int) and not isinstance(burst, bool) and burst >= 1)
    if not valid_rate or not valid_burst:
        return json_response(
            400, {"error": "invalid_rate_limit", "detail": "rate must be > 0, burst an integer >= 1"}
        )
    assert isinstance(per_minute, int | float)
    if app.limiter is None:
        app.limiter = RateLimiter(per_minute, app.config.clock, burst)
    else:
        app.limiter.configure(per_minute, burst)
    log.info("rate limit set to %g/min, burst %s", per_minute, burst)
    return json_response(200, _rate_limit_state(app))


def _set_faults(app: SandboxApp, body: bytes) -> Response:
    try:
        changes = orjson.loads(body or b"{}")
    except orjson.JSONDecodeError:
        return json_response(400, {"error": "invalid_faults", "detail": "body is not JSON"})
    if not isinstance(changes, dict):
        return json_response(400, {"error": "invalid_faults", "detail": "body must be a JSON object"})
    try:
        config = app.faults.update(changes)
    except SandboxConfigError as exc:
        return json_response(400, {"error": "invalid_faults", "detail": str(exc)})
    log.info("fault configuration changed: %s", ", ".join(sorted(changes)))
    return json_response(200, config.to_dict())
