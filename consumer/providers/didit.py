"""The ``didit`` profile: Didit's documented v3 API, which has no idempotency key.

What is sent (docs.didit.me, summarised in docs/providers.md):

* ``create_session`` → ``POST /v3/session/`` JSON; ``aml_screening`` → ``POST /v3/aml/`` JSON;
  ``id_verification``, ``passive_liveness``, ``face_match`` → ``POST /v3/id-verification/``,
  ``/v3/passive-liveness/``, ``/v3/face-match/`` as ``multipart/form-data``: image fields are files (a
  document reference is fetched from the document source and streamed; an inline base64 string is sent
  as the decoded file), every other field a form field.
* ``vendor_data`` is always the envelope's ``subject_id``: Didit links an applicant's sessions, profile,
  blocklist and AML monitoring by it, so it must be the stable subject, never a per-request key.
* ``metadata`` is the caller's metadata with ``{"idv_key": <our idempotency key>}`` merged over it: our
  reference, by which an earlier attempt is found again. Standalone checks are sent with
  ``save_api_request=true`` (a caller's ``false`` is overridden): only a saved check can be looked up.

How a repeat is recognised: a session create returns the existing *unfinished* session for the same
``vendor_data`` and workflow (a partial dedupe: a finished one does not count, and it may be another
request's session); standalone checks are not deduplicated at all. So the crash window after Didit acted
is closed by :meth:`DiditAdapter.lookup`: list the subject's sessions created since the record was first
claimed (``GET /v3/sessions/?vendor_data=…``, newest first), read each one's decision
(``GET /v3/session/{id}/decision/``) and match ``metadata.idv_key``. Found: that is the answer, no
second call. Not found: nothing reached Didit, sending is safe.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import orjson

from consumer.answers import map_status
from consumer.documents import Document, DocumentError, is_reference, sniff
from consumer.errors import UnreconciledAttempt
from consumer.model import Outcome
from consumer.multipart import multipart_body
from consumer.providers.base import Capability, PreparedCall, Sender, register_adapter
from consumer.providers.ietf import read_json_answer
from producer.envelope import Envelope, Operation

if TYPE_CHECKING:
    from consumer.documents import DocumentSource
    from consumer.settings import Settings

__all__ = ["FILE_FIELDS", "DiditAdapter"]

SESSION_PATH = "/v3/session/"
#: Multipart operations and their file fields (the first one is required by Didit).
FILE_FIELDS: dict[str, tuple[str, ...]] = {
    "/v3/id-verification/": ("front_image", "back_image"),
    "/v3/passive-liveness/": ("user_image",),
    "/v3/face-match/": ("user_image", "ref_image"),
}
#: Per standalone path, the decision section whose first entry carries the check's status.
_DECISION_SECTIONS = {
    "/v3/id-verification/": "id_verifications",
    "/v3/aml/": "aml_screenings",
    "/v3/passive-liveness/": "liveness_checks",
    "/v3/face-match/": "face_matches",
}
_JSON = (b"content-type", b"application/json")
# Clock skew allowed between our store's clock and Didit's created_at when choosing candidates.
_SKEW_S = 300.0
_PAGE = 50
_MAX_PAGES = 20  # 1,000 sessions of one subject since the claim: past that, in doubt rather than guess


class _InlineDocument(Document):
    """An image given inline in the request (base64; small: tests and thumbnails), sent as a file part like
    a fetched document. Its bytes are fixed, so streaming them needs none of a source's re-checks."""

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self._read():
            yield chunk


def _inline_document(field: str, value: str) -> Document:
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise DocumentError("document_unreadable", "inline image is not base64", field=field) from None
    if not data:
        raise DocumentError("document_unreadable", "inline image is empty", field=field)

    async def read() -> AsyncIterator[bytes]:
        yield data

    kind = sniff(data[:16]) or "application/octet-stream"
    return _InlineDocument(field, f"{field}.bin", kind, len(data), read)


def _created_at(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class DiditAdapter:
    name = "didit"

    def capability(self, operation: str) -> Capability:
        from producer.envelope import get_operation

        if get_operation(operation).path == SESSION_PATH:
            return Capability("body_field", None, lookup=True)
        return Capability("none", None, lookup=True)

    def _body_fields(self, envelope: Envelope, key: str, standalone: bool) -> dict[str, Any]:
        request = dict(envelope.request)
        caller = request.get("metadata")
        metadata = dict(caller) if isinstance(caller, Mapping) else {}
        metadata["idv_key"] = key
        request["vendor_data"] = envelope.subject_id
        request["metadata"] = metadata
        if standalone:
            request["save_api_request"] = True
        return request

    async def prepare(
        self, operation: Operation, envelope: Envelope, key: str, documents: DocumentSource | None
    ) -> PreparedCall:
        standalone = operation.path != SESSION_PATH
        request = self._body_fields(envelope, key, standalone)
        file_fields = FILE_FIELDS.get(operation.path)
        if file_fields is None:
            body = orjson.dumps(request, option=orjson.OPT_SORT_KEYS)
            return PreparedCall("POST", operation.path, [_JSON], body)

        files: list[Document] = []
        fields: dict[str, str] = {}
        for name, value in sorted(request.items()):
            if is_reference(value):
                if documents is None:
                    raise DocumentError("document_missing", "no document source configured", field=name)
                files.append(await documents.open(value["document"], name))
            elif name in file_fields and isinstance(value, str):
                files.append(_inline_document(name, value))
            elif isinstance(value, str):
                fields[name] = value
            elif isinstance(value, bool):
                fields[name] = "true" if value else "false"
            else:
                fields[name] = orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
        multipart = await multipart_body(fields, files)
        return PreparedCall("POST", operation.path, multipart.headers(), multipart)

    def read(self, operation: Operation, status_code: int, body: bytes) -> Outcome:
        return read_json_answer(operation, status_code, body)

    def read_decision(self, body: bytes, path: str = SESSION_PATH) -> tuple[Outcome, str | None]:
        """An outcome from ``GET /v3/session/{id}/decision/`` (the check's own section first for a
        standalone check), and the decision's ``metadata.idv_key``."""
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            return Outcome("failed", 200, None, "unknown_status"), None
        raw: Any = parsed.get("status")
        section = parsed.get(_DECISION_SECTIONS.get(path, ""))
        if isinstance(section, list) and section and isinstance(section[0], dict) and "status" in section[0]:
            raw = section[0]["status"]
        status, detail = map_status(raw)
        reference = parsed.get("session_id") or parsed.get("request_id")
        metadata = parsed.get("metadata")
        idv_key = metadata.get("idv_key") if isinstance(metadata, dict) else None
        outcome = Outcome(status, 200, str(reference)[:128] if reference is not None else None, detail)
        return outcome, idv_key if isinstance(idv_key, str) else None

    async def lookup(
        self, operation: Operation, envelope: Envelope, key: str, since: float, send: Sender
    ) -> Outcome | None:
        params = {"vendor_data": envelope.subject_id, "limit": str(_PAGE)}
        workflow = envelope.request.get("workflow_id")
        if operation.path == SESSION_PATH and isinstance(workflow, str):
            params["workflow_id"] = workflow
        for page in range(_MAX_PAGES):
            query = urlencode({**params, "offset": str(page * _PAGE)})
            status, body = await send(f"/v3/sessions/?{query}")
            if status != 200:
                raise UnreconciledAttempt(f"listing the subject's sessions answered HTTP {status}", 0)
            try:
                listing = orjson.loads(body)
                rows = listing["results"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                raise UnreconciledAttempt(
                    "listing the subject's sessions gave an unreadable answer", 0
                ) from None
            older = False
            for row in rows:
                if not isinstance(row, dict) or not isinstance(row.get("session_id"), str):
                    continue
                created = _created_at(row.get("created_at"))
                if created is not None and created < since - _SKEW_S:
                    older = True  # newest first: every later row is older still
                    break
                found = await self._match(row["session_id"], key, operation.path, send)
                if found is not None:
                    return found
            if older or not listing.get("next") or len(rows) < _PAGE:
                return None
        raise UnreconciledAttempt(
            f"more than {_MAX_PAGES * _PAGE} sessions of this subject since the first claim; not searched", 0
        )

    async def _match(self, session_id: str, key: str, path: str, send: Sender) -> Outcome | None:
        status, body = await send(f"/v3/session/{quote(session_id, safe='')}/decision/")
        if status == 404:
            return None  # deleted since it was listed
        if status != 200:
            raise UnreconciledAttempt(f"reading a session's decision answered HTTP {status}", 0)
        outcome, idv_key = self.read_decision(body, path)
        if idv_key != key:
            return None
        # Recorded like the answer the earlier attempt would have got, marked as found by reconciliation.
        return Outcome(
            outcome.status, outcome.http_status, outcome.provider_reference, outcome.detail or "reconciled"
        )

    def sign(self, call: PreparedCall, body: bytes) -> list[tuple[bytes, bytes]]:
        return []


def _factory(settings: Settings) -> DiditAdapter:
    return DiditAdapter()


register_adapter("didit", _factory)
