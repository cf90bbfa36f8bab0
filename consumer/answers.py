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
    "STATUS_MAP",
    "UNKNOWN_STATUS",
    "classify_status",
    "decision",
    "error_code",
    "error_code_of",
    "map_status",
    "parse_retry_after",
    "route_missing",
]

_RETRIABLE_STATUS = frozenset({408, 409, 425, 429})
# Error codes meaning "this idempotency key was used with a different request" (IETF draft: 422; Stripe:
# idempotency_error). The provider may have acted on the first one: the outcome is unknown, not failed.
KEY_REUSED_CODES = frozenset({"idempotency_key_reused", "idempotency_key_mismatch", "idempotency_error"})
# A 404 whose error code is one of these (or that has no JSON error code) is about the route, not a resource.
_ROUTE_NOT_FOUND_CODES = frozenset({"not_found", "notfound", "http_404"})

# Every documented status string (Didit's session statuses, its feature statuses, its KYB spellings, and the
# IETF sandbox's), normalised (lower case, "_" as " "), mapped to an outcome status. The complete set of
# outcome statuses: approved, declined, review, created (exists, not decided yet), abandoned, expired,
# failed. A status string not in this table is recorded as "failed" with detail "unknown_status": never a
# silent "unknown" (tests/consumer/test_providers.py walks the table).
STATUS_MAP: dict[str, str] = {
    "approved": "approved",
    "declined": "declined",
    "rejected": "declined",
    "in review": "review",
    "review": "review",
    "not started": "created",
    "in progress": "created",
    "awaiting user": "created",
    "resubmitted": "created",
    "resub requested": "created",
    "not finished": "created",
    "abandoned": "abandoned",
    "expired": "expired",
    "kyc expired": "expired",
}
UNKNOWN_STATUS = "unknown_status"


def map_status(raw: object) -> tuple[str, str | None]:
    """(outcome status, detail) for a provider's status string: ``("failed", "unknown_status")`` for a
    string no documentation lists, or for a missing one."""
    if not isinstance(raw, str):
        return "failed", UNKNOWN_STATUS
    status = STATUS_MAP.get(raw.strip().lower().replace("_", " "))
    if status is None:
        return "failed", UNKNOWN_STATUS
    return status, None


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


def decision(operation: Operation, body: Any) -> tuple[str, str | None, str | None]:
    """Map the provider's JSON answer to (status, provider reference, detail); the status of a nested
    check section (``id_verification``, ``aml``, ``liveness``, ``face_match``, ``decision``) wins over the
    top-level one."""
    if not isinstance(body, dict):
        return "failed", None, UNKNOWN_STATUS
    reference = body.get(operation.reference_field) or body.get("request_id") or body.get("session_id")
    raw: Any = body.get("status")
    for section in ("id_verification", "aml", "liveness", "face_match", "decision"):
        part = body.get(section)
        if isinstance(part, dict) and "status" in part:
            raw = part["status"]
            break
    status, detail = map_status(raw)
    return status, str(reference)[:128] if reference is not None else None, detail


def route_missing(response: httpx.Response) -> bool:
    """A 404 for the endpoint itself (wrong base URL or API version) rather than a documented business 404
    (e.g. ``session_not_found``), which carries its own error code."""
    return error_code(response).lower() in _ROUTE_NOT_FOUND_CODES


def error_code(response: httpx.Response) -> str:
    """A short machine code from an error answer; never the body itself (it may echo personal data)."""
    return error_code_of(response.status_code, response.content)


def error_code_of(status: int, content: bytes) -> str:
    """:func:`error_code` from a status and a body."""
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        return f"http_{status}"
    code = body.get("error") if isinstance(body, dict) else None
    if isinstance(code, str) and code.replace("_", "").isalnum() and len(code) <= 64:
        return code
    return f"http_{status}"
