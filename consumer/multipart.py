"""A streaming ``multipart/form-data`` request body (RFC 7578) for the provider's document uploads.

:class:`MultipartBody` is an async iterable of bytes whose length is known before the first byte is sent
(the parts' headers are built up front and every :class:`~consumer.documents.Document` knows its size), so
the request carries a ``Content-Length`` rather than chunked encoding (some API gateways refuse chunked
uploads). It is **re-iterable**: each ``async for`` streams the whole body again, reading each document from
its source again, so a retry sends the same bytes without the body ever being held in memory; a local file
is read :data:`~consumer.documents.CHUNK_SIZE` bytes at a time. Give it to httpx as
``httpx.Request(..., content=body, headers={"content-length": str(body.content_length), ...})``; every
provider transport (httpx's own, :mod:`consumer.http`'s aiohttp one, ``httpx-aiohttp``) streams it.

Layout (CRLF line ends; text fields first, then files, each in the order given)::

    --<boundary>
    Content-Disposition: form-data; name="vendor_data"

    <UTF-8 value>
    --<boundary>
    Content-Disposition: form-data; name="front_image"; filename="front_image.jpg"
    Content-Type: image/jpeg

    <the document's bytes>
    --<boundary>--

Names and filenames are quoted and escaped as the HTML standard's form encoder does (RFC 7578 §4.2
defers to it): ``"`` → ``%22``, CR → ``%0D``, LF → ``%0A``, the rest as UTF-8. No value can close its
header line or its quoted string. The boundary is 128 random bits, so no part's content can contain it
by chance.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Mapping, Sequence

from consumer.documents import Document

__all__ = ["MultipartBody", "escape_name", "multipart_body"]

_CRLF = b"\r\n"


def escape_name(value: str) -> bytes:
    """A field name or filename for a quoted ``Content-Disposition`` parameter (WHATWG / RFC 7578)."""
    return value.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A").encode("utf-8")


class MultipartBody:
    """The body: text fields, then files. ``content_type`` carries the boundary; ``content_length`` is
    exact. Iterating it again streams it again (each document read from its source again)."""

    __slots__ = ("boundary", "content_length", "content_type", "_parts")

    def __init__(
        self, fields: Mapping[str, str], files: Sequence[Document], boundary: str | None = None
    ) -> None:
        self.boundary = boundary or f"idv-{secrets.token_hex(16)}"
        if not (1 <= len(self.boundary) <= 70) or not self.boundary.isascii() or " " in self.boundary[-1:]:
            raise ValueError("a multipart boundary is 1-70 ASCII characters, not ending in a space")
        delimiter = b"--" + self.boundary.encode("ascii")
        self.content_type = f"multipart/form-data; boundary={self.boundary}"
        parts: list[bytes | Document] = []
        for name, value in fields.items():
            if not isinstance(value, str):
                raise TypeError(f"multipart field {name!r}: value must be a str, got {type(value).__name__}")
            parts.append(
                delimiter
                + _CRLF
                + b'Content-Disposition: form-data; name="'
                + escape_name(name)
                + b'"'
                + _CRLF
                + _CRLF
                + value.encode("utf-8")
                + _CRLF
            )
        for document in files:
            parts.append(
                delimiter
                + _CRLF
                + b'Content-Disposition: form-data; name="'
                + escape_name(document.field)
                + b'"; filename="'
                + escape_name(document.filename)
                + b'"'
                + _CRLF
                + b"Content-Type: "
                + document.content_type.encode("ascii")
                + _CRLF
                + _CRLF
            )
            parts.append(document)
            parts.append(_CRLF)
        parts.append(delimiter + b"--" + _CRLF)
        # Adjacent byte parts merged: fewer, larger writes.
        merged: list[bytes | Document] = []
        for part in parts:
            if isinstance(part, bytes) and merged and isinstance(merged[-1], bytes):
                merged[-1] += part
            else:
                merged.append(part)
        self._parts = tuple(merged)
        self.content_length = sum(p.size if isinstance(p, Document) else len(p) for p in self._parts)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._stream()

    async def _stream(self) -> AsyncIterator[bytes]:
        for part in self._parts:
            if isinstance(part, bytes):
                yield part
            else:
                async for chunk in part.chunks():
                    yield chunk

    def headers(self) -> list[tuple[bytes, bytes]]:
        """``Content-Type`` (with the boundary) and ``Content-Length`` for the request."""
        return [
            (b"content-type", self.content_type.encode("ascii")),
            (b"content-length", str(self.content_length).encode("ascii")),
        ]

    def __repr__(self) -> str:
        return f"MultipartBody({self.content_type!r}, content_length={self.content_length})"


async def multipart_body(fields: Mapping[str, str], files: Sequence[Document]) -> MultipartBody:
    """A :class:`MultipartBody` of ``fields`` (text) and ``files`` (opened documents)."""
    return MultipartBody(fields, files)
