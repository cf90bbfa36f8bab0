"""The ``didit`` profile's admin routes: sessions, the simulated applicant and the webhook sender.

| route | what |
|---|---|
| ``GET /_admin/sessions`` | every session and saved check, with its status history |
| ``GET /_admin/sessions/<id>`` | one of them |
| ``POST /_admin/sessions/<id>/status`` ``{"status": …}`` | the applicant or a reviewer moves the session |
| ``POST /_admin/sessions/<id>/data-updated`` | a reviewer edited its data: a ``data.updated`` webhook |
| ``GET`` / ``POST /_admin/applicant`` | read / change the applicant's delay, jitter, abandon rate |
| ``GET`` / ``POST /_admin/webhooks`` | the sender's settings, faults, events and delivery log / change them |
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .admin import json_object
from .errors import SandboxConfigError
from .messages import Request, Response
from .responses import error, json_response, method_not_allowed
from .sessions import STATUSES, Session

if TYPE_CHECKING:
    from .didit import DiditApi

__all__ = ["route"]

_SESSION_NOT_FOUND = error(404, "session_not_found")


def route(api: DiditApi, request: Request, path: str) -> Response | None:
    method = request.method
    if path in ("/_admin/applicant", "/_admin/webhooks"):
        target = api.applicant if path == "/_admin/applicant" else api.webhooks
        if method == b"GET":
            return json_response(200, target.state())
        if method != b"POST":
            return method_not_allowed("GET", "POST")
        changes = json_object(request.body)
        if changes is None:
            return json_response(400, {"error": "invalid_settings", "detail": "a JSON object"})
        try:
            target.configure(changes)
        except SandboxConfigError as exc:
            return json_response(400, {"error": "invalid_settings", "detail": str(exc)})
        return json_response(200, target.state())
    if path == "/_admin/sessions":
        if method != b"GET":
            return method_not_allowed("GET")
        return json_response(200, {"sessions": [s.admin_view() for s in api.sessions]})
    parts = path.split("/")  # "", "_admin", "sessions", id, [action]
    if len(parts) < 4 or parts[2] != "sessions" or len(parts) > 5:
        return None
    session = api.sessions.get(parts[3])
    if len(parts) == 4:
        if method != b"GET":
            return method_not_allowed("GET")
        return _SESSION_NOT_FOUND if session is None else json_response(200, session.admin_view())
    action = parts[4]
    if action not in ("status", "data-updated"):
        return None
    if method != b"POST":
        return method_not_allowed("POST")
    if session is None:
        return _SESSION_NOT_FOUND
    if action == "status":
        return _status(api, session, request.body)
    event = api.webhooks.emit(session, "data.updated") if session.kind == "session" else None
    return json_response(200, {**session.admin_view(), "event_id": event.event_id if event else None})


def _status(api: DiditApi, session: Session, raw: bytes) -> Response:
    body = json_object(raw)
    status = body.get("status") if body is not None else None
    if status not in STATUSES:
        return json_response(400, {"error": "invalid_status", "detail": "one of " + ", ".join(STATUSES)})
    api.change_status(session, status)
    return json_response(200, session.admin_view())
