"""The ``didit`` profile: Didit's v3 contract over the sandbox's shared pipeline.

Requests pass the same authentication, rate limit and fault steps as in the ``ietf`` profile
(``SandboxApp.admit``), but there is no idempotency layer: an ``Idempotency-Key`` header is ignored, as
Didit ignores it. What dedupes instead is Didit's own rule: creating a session for a (``workflow_id``,
``vendor_data``) that already has an *unfinished* session returns that session (200, nothing created).
Standalone checks dedupe nothing: each one is a side effect.

Attempts are filed in the ledger under ``metadata.idv_key`` (our reference), and every side effect is
an ``Effect`` with the profile, operation, ``vendor_data`` and ``idv_key``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode

import orjson

from . import didit_admin
from .applicant import Applicant
from .checks import CheckInput, CheckInvalid, json_check, multipart_check
from .decisions import decide
from .ledger import Attempt, Effect, Outcome
from .messages import Admitted, Drop, Request, Response
from .multipart import is_multipart
from .provider import idv_key_of
from .responses import error, json_response, method_not_allowed
from .sessions import STATUSES, Session, SessionStore, iso_time
from .webhooks import WebhookSender

if TYPE_CHECKING:
    from .app import SandboxApp

__all__ = ["DiditApi"]

log = logging.getLogger(__name__)

_SESSION_PATH = re.compile(r"/v3/session/([^/]+)/(decision|delete)/?")
_CHECKS = {
    "/v3/id-verification": "id_verification",
    "/v3/passive-liveness": "passive_liveness",
    "/v3/face-match": "face_match",
    "/v3/aml": "aml_screening",
}
_NOT_FOUND = error(404, "not_found")
_SESSION_NOT_FOUND = error(404, "session_not_found")
_INTERNAL = error(500, "internal")
_NO_CONTENT = Response(204, (), b"")
_DEFAULT_LIMIT = 50
_MAX_LIMIT = 1000


def _invalid(detail: str) -> Response:
    return json_response(400, {"error": "validation_error", "detail": detail})


def _base_url(request: Request, fallback: str) -> str:
    host = request.header(b"host")
    return f"http://{host.decode('latin-1')}" if host else fallback


class DiditApi:
    """Routes and business handling of the ``didit`` profile; state lives in :attr:`sessions`."""

    def __init__(self, app: SandboxApp) -> None:
        self.app = app
        self.sessions = SessionStore(app.config.clock)
        config = app.config.didit
        self.webhooks = WebhookSender(app.config.clock, config.webhook_settings())
        self.applicant = Applicant(self, config)

    def reset(self) -> None:
        self.applicant.cancel()
        self.webhooks.reset()
        self.sessions.clear()

    async def handle(self, request: Request, path: str, route: str) -> Response | Drop:
        method = request.method
        if route == "/v3/session":
            if method != b"POST":
                return method_not_allowed("POST")
            body, key = _json_body(request.body)
            return await self._write(request, path, "create_session", self._create, body, key)
        if route == "/v3/sessions":
            if method != b"GET":
                return method_not_allowed("GET")
            if not path.endswith("/"):
                query = request.target.partition(b"?")[2].decode("latin-1")
                location = "/v3/sessions/" + (f"?{query}" if query else "")
                return json_response(301, {}, ((b"location", location.encode("latin-1")),))
            return await self._read(request, path, "list_sessions", self._list)
        kind = _CHECKS.get(route)
        if kind is not None:
            if method != b"POST":
                return method_not_allowed("POST")
            return await self._check(request, path, kind)
        match = _SESSION_PATH.fullmatch(path)
        if match is not None:
            session_id, action = match.groups()
            if action == "decision":
                if method != b"GET":
                    return method_not_allowed("GET")
                return await self._read(
                    request, path, "get_decision", lambda _r, a: self._decision(session_id, a)
                )
            if method != b"DELETE":
                return method_not_allowed("DELETE")
            return await self._write(
                request, path, "delete_session", lambda _r, a, _b: self._delete(session_id, a)
            )
        return _NOT_FOUND

    # -- the pipeline around business handling -------------------------------------------------

    async def _read(
        self, request: Request, path: str, operation: str, handler: Callable[[Request, Attempt], Response]
    ) -> Response | Drop:
        app = self.app
        attempt = app.new_attempt(request, path, None)
        attempt.operation = operation
        admitted = app.admit(request, attempt, None, roll_faults=app.faults.config.read_faults)
        if not isinstance(admitted, Admitted):
            return admitted
        await app.delay(admitted.fault)
        response = handler(request, attempt)
        return app.conclude(None, attempt, Outcome.PROCESSED, response, admitted.fault)

    async def _write(
        self,
        request: Request,
        path: str,
        operation: str,
        handler: Callable[[Request, Attempt, Any], Response],
        body: Any = None,
        key: str | None = None,
    ) -> Response | Drop:
        """Admit, wait the configured latency, run ``handler(request, attempt, body)`` with no await in
        between its check and its change (so two concurrent creates cannot both create), record."""
        app = self.app
        attempt = app.new_attempt(request, path, None)
        attempt.operation = operation
        admitted = app.admit(request, attempt, key)
        if not isinstance(admitted, Admitted):
            return admitted
        fault = admitted.fault
        try:
            await app.delay(fault)
            response = handler(request, attempt, body)
        except Exception:
            log.exception("business handling failed on %s", operation)
            return app.conclude(key, attempt, Outcome.INTERNAL_ERROR, _INTERNAL, fault)
        return app.conclude(key, attempt, Outcome.PROCESSED, response, fault)

    async def _check(self, request: Request, path: str, kind: str) -> Response | Drop:
        content_type = request.header(b"content-type")
        text = content_type.decode("latin-1") if content_type is not None else None
        parsed: CheckInput | CheckInvalid
        if kind == "aml_screening":
            parsed = json_check(request.body)
        elif not is_multipart(text):
            parsed = CheckInvalid("content_type", None)
        else:
            parsed = await multipart_check(kind, text or "", request.body)
        key = parsed.idv_key
        return await self._write(request, path, kind, self._run_check, parsed, key)

    def _effect(
        self, attempt: Attempt, operation: str, session: Session, files: tuple[dict[str, Any], ...] = ()
    ) -> None:
        attempt.side_effect = True
        attempt.reference = session.session_id
        self.app.ledger.record_effect(
            Effect(
                at=attempt.at,
                profile="didit",
                operation=operation,
                vendor_data=session.vendor_data,
                idv_key=idv_key_of(session.metadata),
                reference=session.session_id,
                api_key_id=attempt.api_key_id,
                files=files,
            )
        )

    # -- business handling ----------------------------------------------------------------------

    def _create(self, request: Request, attempt: Attempt, body: Any) -> Response:
        if not isinstance(body, dict):
            return _invalid("body")
        workflow_id = body.get("workflow_id")
        if not isinstance(workflow_id, str) or not workflow_id:
            return _invalid("workflow_id")
        for name in ("vendor_data", "callback", "language"):
            if body.get(name) is not None and not isinstance(body.get(name), str):
                return _invalid(name)
        metadata = body.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            return _invalid("metadata")
        vendor_data = body.get("vendor_data")
        if vendor_data:
            existing = self.sessions.unfinished(workflow_id, vendor_data)
            if existing is not None:
                attempt.reference = existing.session_id
                return json_response(200, existing.created_body())
        session = self.sessions.add(
            "session",
            workflow_id=workflow_id,
            vendor_data=vendor_data,
            callback=body.get("callback"),
            metadata=metadata,
            planned=decide(body),
            base_url=_base_url(request, self.app.base_url),
        )
        self._effect(attempt, "create_session", session)
        self.applicant.start(session)
        return json_response(201, session.created_body())

    def _run_check(self, request: Request, attempt: Attempt, parsed: CheckInput | CheckInvalid) -> Response:
        if isinstance(parsed, CheckInvalid):
            return _invalid(parsed.detail)
        session = self.sessions.add(
            parsed.kind,
            workflow_id=None,
            vendor_data=parsed.vendor_data,
            callback=None,
            metadata=parsed.metadata,
            planned=parsed.decision,
            result=parsed.result,
        )
        if not parsed.save:
            self.sessions.delete(session.session_id)
        self._effect(attempt, parsed.kind, session, parsed.files)
        return json_response(
            200,
            {
                "request_id": session.session_id,
                parsed.answer_field: parsed.result,
                "vendor_data": session.vendor_data,
                "metadata": session.metadata,
                "created_at": iso_time(session.created_at),
            },
        )

    def _list(self, request: Request, attempt: Attempt) -> Response:
        query = parse_qs(request.target.partition(b"?")[2].decode("latin-1"), keep_blank_values=False)
        params = {name: values[0] for name, values in query.items() if values}
        try:
            limit = int(params.get("limit", _DEFAULT_LIMIT))
            offset = int(params.get("offset", 0))
        except ValueError:
            return _invalid("limit" if "limit" in params else "offset")
        if not 1 <= limit <= _MAX_LIMIT or offset < 0:
            return _invalid("limit" if not 1 <= limit <= _MAX_LIMIT else "offset")
        status = params.get("status")
        if status is not None and status not in STATUSES:
            return _invalid("status")
        found = self.sessions.find(
            vendor_data=params.get("vendor_data"), workflow_id=params.get("workflow_id"), status=status
        )
        page = found[offset : offset + limit]
        base = _base_url(request, self.app.base_url) + "/v3/sessions/?"

        def link(at: int) -> str:
            return base + urlencode({**params, "limit": limit, "offset": at})

        return json_response(
            200,
            {
                "count": len(found),
                "next": link(offset + limit) if offset + limit < len(found) else None,
                "previous": link(max(0, offset - limit)) if offset > 0 else None,
                "results": [s.row() for s in page],
            },
        )

    def _decision(self, session_id: str, attempt: Attempt) -> Response:
        session = self.sessions.get(session_id)
        if session is None:
            return _SESSION_NOT_FOUND
        attempt.reference = session_id
        return json_response(200, session.decision_body())

    def _delete(self, session_id: str, attempt: Attempt) -> Response:
        if not self.sessions.delete(session_id):
            return _SESSION_NOT_FOUND
        attempt.reference = session_id
        return _NO_CONTENT

    # -- admin and lifecycle --------------------------------------------------------------------

    def admin(self, request: Request, route: str) -> Response | None:
        """The profile's ``/_admin`` routes (``didit_admin``); ``None`` for a route that is not one."""
        return didit_admin.route(self, request, route)

    def change_status(self, session: Session, status: str) -> None:
        """Move a session (the applicant, or a reviewer at ``/_admin``); a session's change is a webhook."""
        self.sessions.transition(session, status)
        if session.kind == "session":
            self.webhooks.emit(session, "status.updated")

    async def aclose(self) -> None:
        await self.applicant.aclose()
        await self.webhooks.aclose()


def _json_body(raw: bytes) -> tuple[Any, str | None]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None, None
    return body, idv_key_of(body.get("metadata")) if isinstance(body, dict) else None
