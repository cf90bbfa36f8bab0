"""The ``didit`` profile's standalone checks: reading their input and choosing their outcome.

ID verification, passive liveness and face match take ``multipart/form-data`` (image files plus text
fields); AML screening takes JSON. The outcome comes from ``decisions.decide`` over what a test can
steer without real images: the text fields (``metadata`` included) and each file's name and type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from .decisions import Decision, decide
from .multipart import FormError, parse_form
from .provider import idv_key_of
from .sessions import check_result

__all__ = ["CheckInput", "CheckInvalid", "json_check", "multipart_check"]

_REQUIRED_FILES = {
    "id_verification": ("front_image",),
    "passive_liveness": ("user_image",),
    "face_match": ("user_image", "ref_image"),
}
_ANSWER_FIELD = {
    "id_verification": "id_verification",
    "passive_liveness": "liveness",
    "face_match": "face_match",
    "aml_screening": "aml",
}
_AML_TEXT = ("full_name", "entity_type", "date_of_birth", "nationality", "document_number", "vendor_data")


@dataclass(frozen=True, slots=True)
class CheckInvalid:
    """The input is not acceptable: 400 ``validation_error`` naming ``detail`` (no side effect)."""

    detail: str
    idv_key: str | None


@dataclass(frozen=True, slots=True)
class CheckInput:
    kind: str
    vendor_data: str | None
    metadata: dict[str, Any] | None
    save: bool
    decision: Decision
    result: dict[str, Any]
    files: tuple[dict[str, Any], ...] = field(default=())

    @property
    def idv_key(self) -> str | None:
        return idv_key_of(self.metadata)

    @property
    def answer_field(self) -> str:
        return _ANSWER_FIELD[self.kind]


def _flag(value: object) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def _metadata(value: object) -> tuple[bool, dict[str, Any] | None]:
    """``(ok, metadata)``: an object, a JSON string of one, or absent."""
    if value is None or value == "":
        return True, None
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            return False, None
    if isinstance(value, dict):
        return True, value
    return False, None


async def multipart_check(kind: str, content_type: str, body: bytes) -> CheckInput | CheckInvalid:
    try:
        form = await parse_form(content_type, body)
    except FormError as exc:
        return CheckInvalid(exc.detail, None)
    ok, metadata = _metadata(form.fields.get("metadata"))
    if not ok:
        return CheckInvalid("metadata", None)
    key = idv_key_of(metadata)
    for name in _REQUIRED_FILES[kind]:
        part = form.files.get(name)
        if part is None or part.size == 0:
            return CheckInvalid(name, key)
    save = _flag(form.fields.get("save_api_request", "true"))
    if save is None:
        return CheckInvalid("save_api_request", key)
    steering = {
        "fields": form.fields,
        "files": [[f.filename, f.content_type] for f in form.files.values()],
    }
    decision = decide(steering)
    return CheckInput(
        kind=kind,
        vendor_data=form.fields.get("vendor_data"),
        metadata=metadata,
        save=save,
        decision=decision,
        result=check_result(kind, decision, form.fields.get("document_type")),
        files=tuple(f.to_dict() for f in form.files.values()),
    )


def json_check(raw: bytes) -> CheckInput | CheckInvalid:
    """``POST /v3/aml/``."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return CheckInvalid("body", None)
    if not isinstance(body, dict):
        return CheckInvalid("body", None)
    ok, metadata = _metadata(body.get("metadata"))
    if not ok:
        return CheckInvalid("metadata", None)
    key = idv_key_of(metadata)
    full_name = body.get("full_name")
    if not isinstance(full_name, str) or not full_name.strip():
        return CheckInvalid("full_name", key)
    for name in _AML_TEXT:
        if body.get(name) is not None and not isinstance(body.get(name), str):
            return CheckInvalid(name, key)
    save = _flag(body.get("save_api_request", True))
    if save is None:
        return CheckInvalid("save_api_request", key)
    decision = decide(body)
    return CheckInput(
        kind="aml_screening",
        vendor_data=body.get("vendor_data"),
        metadata=metadata,
        save=save,
        decision=decision,
        result=check_result("aml_screening", decision),
    )
