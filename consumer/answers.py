"""How a provider's answer is read: terminal, retriable, configuration or in doubt; status and reference.

Classification of answers:

====================  ===========================================================================
2xx                   success; a business "Declined" is a successful call and recorded as such
400, 422, other 4xx,  terminal: recorded as a FAILED outcome, never retried
a business 404
401, 403              configuration (bad key, out of credit): :class:`ProviderAuthError` stops the daemon
3xx, 405, a 404 for   configuration (wrong ``IDV_PROVIDER_URL``, a proxy, a moved API):
the route itself      :class:`ProviderConfigError` (a ``ProviderAuthError``) stops the daemon too
``idempotency_key_    in doubt (:class:`ProviderInDoubt`): the provider holds this key for a different
reused`` (any 4xx)    body; it may have acted. Never recorded as FAILED: dead-lettered ``in_doubt``
408, 409, 425, 429,   retried with exponential backoff and jitter up to a ceiling; ``Retry-After`` on
5xx, transport        429/503 is a minimum wait, capped at ``retry_after_max_s``
errors, timeouts
====================  ===========================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import orjson

from producer.envelope import Operation

__all__ = [
    "KEY_REUSED_CODES",
    "classify_status",
    "decision",
    "error_code",
    "parse_retry_after",
    "route_missing",
]

_RETRIABLE_STATUS = frozenset({408, 409, 425, 429})
# Error codes meaning "this idempotency key was used with a different request" (IETF draft: 422; Stripe:
# idempotency_error). The provider may have acted on the first one: the outcome is unknown, not failed.
KEY_REUSED_CODES = frozenset({"idempotency_key_reused", "idempotency_key_mismatch", "idempotency_error"})
# A 404 whose error code is one of these (or that has no JSON error code) is about the route, not a resource.
_ROUTE_NOT_FOUND_CODES = frozenset({"not_found", "notfound", "http_404"})

_DECISIONS = {
    "approved": "approved",
    "declined": "declined",
    "rejected": "declined",
    "in review": "review",
    "in_review": "review",
    "review": "review",
    "not started": "created",
    "in progress": "created",
}


def classify_status(status: int) -> str:
    """``"ok"``, ``"auth"``, ``"config"``, ``"retry"`` or ``"terminal"`` (a 404 is refined by the body)."""
    if 200 <= status < 300:
        return "ok"
    if status in (401, 403):
        return "auth"
    if 300 <= status < 400 or status == 405:
        return "config"
    if status in _RETRIABLE_STATUS or status >= 500:
        return "retry"
    return "terminal"


def parse_retry_after(
    value: str | None, now: Callable[[], datetime] = lambda: datetime.now(UTC)
) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date); ``None`` when absent or invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delta: float = (when - now()).total_seconds()
    return max(0.0, delta)


def decision(operation: Operation, body: Any) -> tuple[str, str | None]:
    """Map the provider's JSON answer to (status, provider reference)."""
    if not isinstance(body, dict):
        return "unknown", None
    reference = body.get(operation.reference_field) or body.get("request_id") or body.get("session_id")
    raw: Any = body.get("status")
    for section in ("id_verification", "aml", "decision"):
        part = body.get(section)
        if isinstance(part, dict) and "status" in part:
            raw = part["status"]
            break
    status = _DECISIONS.get(str(raw).strip().lower(), "unknown") if raw is not None else "unknown"
    return status, str(reference)[:128] if reference is not None else None


def route_missing(response: httpx.Response) -> bool:
    """A 404 for the endpoint itself (wrong base URL or API version) rather than a documented business 404
    (e.g. ``session_not_found``), which carries its own error code."""
    return error_code(response).lower() in _ROUTE_NOT_FOUND_CODES


def error_code(response: httpx.Response) -> str:
    """A short machine code from an error answer; never the body itself (it may echo personal data)."""
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return f"http_{response.status_code}"
    code = body.get("error") if isinstance(body, dict) else None
    if isinstance(code, str) and code.replace("_", "").isalnum() and len(code) <= 64:
        return code
    return f"http_{response.status_code}"
