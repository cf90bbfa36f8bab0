"""Reading ``multipart/form-data`` request bodies (the ``didit`` profile's standalone checks).

The parsing is aiohttp's :class:`~aiohttp.MultipartReader` (already a dependency, well kept): the
transport has the whole body in memory, so it is fed to an in-memory stream at once. File parts are
hashed and measured, never kept: the sandbox decides from field values, file names and types, and the
ledger can still show that an upload of several MB arrived intact (size and SHA-256).
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field

from aiohttp import BodyPartReader, MultipartReader, StreamReader
from aiohttp.base_protocol import BaseProtocol

from .views import pick

__all__ = ["FilePart", "Form", "FormError", "is_multipart", "parse_form"]

_MAX_PARTS = 64
_MAX_FIELD_BYTES = 1024 * 1024
_CHUNK = 256 * 1024


class FormError(Exception):
    """The body is not a usable ``multipart/form-data`` body; ``detail`` names what is wrong."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True, slots=True)
class FilePart:
    field: str
    filename: str
    content_type: str
    size: int
    sha256: str

    def to_dict(self) -> dict[str, object]:
        return pick(self)


@dataclass(slots=True)
class Form:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, FilePart] = field(default_factory=dict)


def is_multipart(content_type: str | None) -> bool:
    return content_type is not None and content_type.split(";", 1)[0].strip().lower() == "multipart/form-data"


async def parse_form(content_type: str, body: bytes) -> Form:
    """Parse a whole ``multipart/form-data`` body; raises :class:`FormError`.

    A field or file repeated under one name keeps its first value (Didit takes one per name).
    """
    if not is_multipart(content_type) or "boundary=" not in content_type:
        raise FormError("content_type")
    loop = asyncio.get_running_loop()
    # The limit sits above the body size so that feeding it whole never asks the (absent) transport to
    # pause reading.
    stream = StreamReader(BaseProtocol(loop), max(len(body) + 1, 2**16), loop=loop)
    stream.feed_data(body)
    stream.feed_eof()
    reader = MultipartReader({"Content-Type": content_type}, stream)
    form = Form()
    try:
        for _ in range(_MAX_PARTS + 1):
            part = await reader.next()
            if part is None:
                return form
            if not isinstance(part, BodyPartReader) or not part.name:
                raise FormError("body")
            await _read_part(part, form)
    except (ValueError, AssertionError, UnicodeDecodeError) as exc:
        # aiohttp reports a malformed body (bad boundary, truncated part) with these.
        raise FormError("body") from exc
    raise FormError("too_many_parts")


async def _read_part(part: BodyPartReader, form: Form) -> None:
    name = part.name
    assert name is not None
    if part.filename is None:
        data = bytearray()
        while chunk := await part.read_chunk(_CHUNK):
            data += chunk
            if len(data) > _MAX_FIELD_BYTES:
                raise FormError(name)
        form.fields.setdefault(name, data.decode("utf-8"))
        return
    digest = hashlib.sha256()
    size = 0
    while chunk := await part.read_chunk(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    content_type = part.headers.get("Content-Type", "application/octet-stream")
    form.files.setdefault(name, FilePart(name, part.filename, content_type, size, digest.hexdigest()))
