"""Business handling of the ``ietf`` profile's Didit-style v3 endpoints (JSON bodies).

This is the only place a *side effect* happens (a session created, a check run): the pipeline in
``app`` calls it at most once per idempotency key, and the ledger counts the calls that performed
one. Responses never echo images, document numbers or names.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass

import orjson

from .decisions import aml_details, decide, id_warnings
from .sessions import check_result

__all__ = ["Endpoint", "Provider", "Result", "idv_key_of"]


class Endpoint(enum.Enum):
    SESSION = "/v3/session/"
    ID_VERIFICATION = "/v3/id-verification/"
    PASSIVE_LIVENESS = "/v3/passive-liveness/"
    FACE_MATCH = "/v3/face-match/"
    AML = "/v3/aml/"


_REQUIRED = {
    Endpoint.SESSION: ("workflow_id",),
    Endpoint.ID_VERIFICATION: ("document_type", "front_image"),
    Endpoint.PASSIVE_LIVENESS: ("user_image",),
    Endpoint.FACE_MATCH: ("user_image", "ref_image"),
    Endpoint.AML: ("full_name",),
}


_OPERATIONS = {
    Endpoint.SESSION: "create_session",
    Endpoint.ID_VERIFICATION: "id_verification",
    Endpoint.PASSIVE_LIVENESS: "passive_liveness",
    Endpoint.FACE_MATCH: "face_match",
    Endpoint.AML: "aml_screening",
}
_SCORED = {Endpoint.PASSIVE_LIVENESS: "liveness", Endpoint.FACE_MATCH: "face_match"}
"""The checks answered ``{status, score}`` (as in the ``didit`` profile), by their answer's field."""


@dataclass(frozen=True, slots=True)
class Result:
    status: int
    body: dict[str, object]
    side_effect: bool
    effect: tuple[str, str | None, str | None, str] | None = None
    """``(operation, vendor_data, metadata.idv_key, reference)`` of the side effect, for the ledger."""


def idv_key_of(metadata: object) -> str | None:
    """``metadata.idv_key`` when the caller set one (our reference carried in the provider's metadata)."""
    if isinstance(metadata, dict):
        value = metadata.get("idv_key")
        if isinstance(value, str):
            return value
    return None


def _invalid(detail: str) -> Result:
    return Result(422, {"error": "validation_error", "detail": detail}, side_effect=False)


class Provider:
    def __init__(self) -> None:
        self._sessions = 0

    def reset(self) -> None:
        self._sessions = 0

    def handle(self, endpoint: Endpoint, raw_body: bytes, base_url: str) -> Result:
        try:
            body = orjson.loads(raw_body)
        except orjson.JSONDecodeError:
            return _invalid("body")
        if not isinstance(body, dict):
            return _invalid("body")
        for name in _REQUIRED[endpoint]:
            if not isinstance(body.get(name), str):
                return _invalid(name)
        decision = decide(body)
        request_id = str(uuid.uuid4())
        vendor_data = body.get("vendor_data")
        effect = (
            _OPERATIONS[endpoint],
            vendor_data if isinstance(vendor_data, str) else None,
            idv_key_of(body.get("metadata")),
            request_id,
        )
        if endpoint is Endpoint.SESSION:
            self._sessions += 1
            return Result(
                201,
                {
                    "session_id": request_id,
                    "session_number": self._sessions,
                    "session_token": uuid.uuid4().hex[:12],
                    "workflow_id": body["workflow_id"],
                    "status": "Not Started",
                    "url": f"{base_url}/session/{request_id}",
                    "vendor_data": body.get("vendor_data"),
                    "callback": body.get("callback"),
                    "decision_hint": decision.value,
                },
                side_effect=True,
                effect=effect,
            )
        if endpoint is Endpoint.ID_VERIFICATION:
            return Result(
                200,
                {
                    "request_id": request_id,
                    "id_verification": {
                        "status": decision.value,
                        "document_type": body["document_type"],
                        "warnings": id_warnings(decision),
                    },
                },
                side_effect=True,
                effect=effect,
            )
        if endpoint in _SCORED:
            return Result(
                200,
                {"request_id": request_id, _SCORED[endpoint]: check_result(effect[0], decision)},
                side_effect=True,
                effect=effect,
            )
        total_hits, score = aml_details(decision)
        return Result(
            200,
            {
                "request_id": request_id,
                "aml": {"status": decision.value, "total_hits": total_hits, "score": score},
            },
            side_effect=True,
            effect=effect,
        )
