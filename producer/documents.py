"""The document side of the contract: content types read from bytes, and the local document store's layout.

An envelope carries a document reference ``{"document": "<uri>"}`` instead of an image (docs/documents.md).
This module is what both sides share about the bytes behind one: :func:`sniff` (the content type from the
magic number, never from a name; the daemon checks the same when it opens a document) and
:func:`store_local_document`, which puts a file into a local document directory under its content address
(``sha256/<2 hex>/<64 hex>.<ext>``) and returns its ``local:`` URI, for ``idv-publish one --document``.
The consumer's sources (``consumer/documents.py``) import these; this package never imports the consumer.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

from producer.errors import VerificationError

__all__ = [
    "CONTENT_TYPES",
    "DEFAULT_MAX_BYTES",
    "SNIFF_BYTES",
    "DocumentFileError",
    "local_uri",
    "sniff",
    "store_local_document",
]

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
#: content type → file name extension.
CONTENT_TYPES = {
    "image/jpeg": "jpg",
    "image/png": "png",
    "image/webp": "webp",
    "image/tiff": "tiff",
    "application/pdf": "pdf",
}
#: How many leading bytes :func:`sniff` needs.
SNIFF_BYTES = 16
_COPY_CHUNK = 256 * 1024


def sniff(head: bytes) -> str | None:
    """The content type of a document from its first bytes (:data:`SNIFF_BYTES`), or None if unknown:
    JPEG, PNG, WebP, TIFF (either byte order) or PDF."""
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "image/tiff"
    if head.startswith(b"%PDF-"):
        return "application/pdf"
    return None


class DocumentFileError(VerificationError, ValueError):
    """A file cannot be stored as a document (unreadable, empty, too large, not a known type). The message
    never contains the file's content."""


def local_uri(relative: str) -> str:
    return f"local:{relative}"


def store_local_document(
    source: str | os.PathLike[str], root: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES
) -> str:
    """Copy ``source`` into ``root`` under its content address and return its ``local:`` URI.

    One pass: the file is read in chunks into a temporary file beside the destination while it is hashed
    (never whole in memory), flushed to disk, then renamed into place, so a reader sees either no file or
    the complete one. Storing the same bytes again yields the same name (and replaces it with itself). It is
    created readable by its owner only (``0600``): it is personal data."""
    src = Path(source)
    base = Path(root)
    try:
        reader = src.open("rb")
    except OSError as exc:
        raise DocumentFileError(f"{src}: cannot read the file ({exc.strerror})") from None
    with reader:
        try:
            size = os.fstat(reader.fileno()).st_size
        except OSError as exc:  # pragma: no cover - fstat on an open file
            raise DocumentFileError(f"{src}: cannot read the file ({exc.strerror})") from None
        if size > max_bytes:
            raise DocumentFileError(f"{src}: {size} bytes, limit is {max_bytes} (IDV_DOCUMENTS_MAX_BYTES)")
        head = reader.read(SNIFF_BYTES)
        if not head:
            raise DocumentFileError(f"{src}: the file is empty")
        kind = sniff(head)
        if kind is None:
            raise DocumentFileError(f"{src}: not a JPEG, PNG, WebP, TIFF or PDF file (read from its bytes)")
        staging = base / "sha256"
        try:
            staging.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=".upload-", dir=staging)
        except OSError as exc:
            raise DocumentFileError(f"{base}: cannot store the document ({exc.strerror})") from None
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                hexdigest = _copy(reader, out, head, max_bytes, src)
            relative = f"sha256/{hexdigest[:2]}/{hexdigest}.{CONTENT_TYPES[kind]}"
            final = base / relative
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)  # atomic; an identical earlier copy is replaced by the same bytes
            _fsync_dir(final.parent)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if isinstance(exc, OSError):
                raise DocumentFileError(f"{base}: cannot store the document ({exc.strerror})") from None
            raise
    return local_uri(relative)


def _copy(reader: BinaryIO, out: BinaryIO, head: bytes, max_bytes: int, src: Path) -> str:
    """Copy ``head`` and the rest of ``reader`` to ``out`` in chunks, flushed to disk; the SHA-256 hex."""
    digest = hashlib.sha256()
    written = 0
    chunk = head
    while chunk:
        written += len(chunk)
        if written > max_bytes:  # the file grew while being copied
            raise DocumentFileError(f"{src}: more than {max_bytes} bytes (IDV_DOCUMENTS_MAX_BYTES)")
        digest.update(chunk)
        out.write(chunk)
        chunk = reader.read(_COPY_CHUNK)
    out.flush()
    os.fsync(out.fileno())
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    """Make the rename durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
