"""Document references (claim checks): where the daemon finds the image bytes an envelope points at.

ID images are megabytes of personal data: they never travel in Kafka messages (a 1 MiB record limit, and a
dead-letter copy of every bad message). An envelope's ``request`` carries a **reference** instead, a field
whose value is ``{"document": "<uri>"}``, and the daemon opens the bytes at call time from a
:class:`DocumentSource`, then streams them as the provider's multipart upload (:mod:`consumer.multipart`).

URIs, and the source that serves each scheme (:class:`DocumentSources` routes by scheme; register another
:class:`DocumentSource` for more):

* ``local:<relative/path>`` — a file under ``IDV_DOCUMENTS_DIR`` (:class:`LocalDocumentSource`). Absolute
  paths, ``..``, and symlinks that lead out of the directory are refused.
* ``http://…`` / ``https://…`` — an HTTP(S) document store
  (:class:`~consumer.document_http.HttpDocumentSource`), only under the URL prefixes of
  ``IDV_DOCUMENTS_HTTP_ALLOW``; the bearer token ``IDV_DOCUMENTS_TOKEN`` goes to those and nowhere else.

The content type is read from the bytes (magic numbers of JPEG, PNG, WebP, TIFF, PDF), never from a name.
A document bigger than ``IDV_DOCUMENTS_MAX_BYTES`` is refused before it is read. A :class:`Document` is
re-iterable: every :meth:`Document.chunks` reads the source again (a retry streams again), and a source
that yields other bytes than it announced (a size or type that changed since :meth:`DocumentSource.open`)
fails the stream rather than send a body whose length disagrees with its ``Content-Length``.

Failures are :class:`DocumentError` with a ``reason`` (a dead-letter reason, :data:`DOCUMENT_REASONS`):

========================  ==========================================================  ==========
reason                    cause                                                       retriable
========================  ==========================================================  ==========
``document_missing``      no such file; HTTP 404 / 410                                no
``document_too_large``    over ``IDV_DOCUMENTS_MAX_BYTES``; HTTP 413                  no
``document_unreadable``   bad reference, outside the root or the allowed URLs, not a   no
                          regular file, empty, permission denied, not a known type,
                          other 4xx, a redirect, changed while being read
``document_unreadable``   (:class:`DocumentUnavailable`) HTTP 5xx / 408 / 425 / 429,  yes
                          a timeout, a connection error: the same reference may work
                          on a later attempt
========================  ==========================================================  ==========

Errors name the request field and the cause, never the URI or path (a caller may put a name in a file
name) and never the bytes. :func:`document_dead_letter` turns one into the dead letter the pipeline writes.
"""

from __future__ import annotations

import base64
import binascii
import errno
import io
import os
import stat
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, TypeVarTuple, runtime_checkable

import anyio

from consumer.errors import ConsumerError
from consumer.model import DeadLetter
from producer.documents import CONTENT_TYPES, DEFAULT_MAX_BYTES, SNIFF_BYTES, sniff
from producer.envelope import DOCUMENT_KEY

if TYPE_CHECKING:
    from consumer.settings import Settings

__all__ = [
    "CHUNK_SIZE",
    "CONTENT_TYPES",
    "DEFAULT_MAX_BYTES",
    "DOCUMENT_REASONS",
    "LOCAL_SCHEME",
    "REFERENCE_KEY",
    "SNIFF_BYTES",
    "THREADS",
    "Document",
    "DocumentError",
    "DocumentSource",
    "DocumentSources",
    "DocumentUnavailable",
    "LocalDocumentSource",
    "document_dead_letter",
    "document_error_in",
    "inline_document",
    "open_documents",
    "is_reference",
    "references",
    "sniff",
    "source_from_settings",
]

REFERENCE_KEY = DOCUMENT_KEY
LOCAL_SCHEME = "local"
#: Bytes per read: a local file is never in memory whole, only one chunk of it at a time.
CHUNK_SIZE = 64 * 1024
#: Worker threads one :class:`LocalDocumentSource` uses at most at once (its filesystem calls).
THREADS = 8
DOCUMENT_REASONS = ("document_missing", "document_unreadable", "document_too_large")

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


class DocumentError(ConsumerError):
    """A referenced document cannot be used. ``reason`` is a dead-letter reason (:data:`DOCUMENT_REASONS`);
    the message names the field and the cause, never the URI, the path or the bytes."""

    retriable = False

    def __init__(self, reason: str, detail: str, *, field: str = "") -> None:
        assert reason in DOCUMENT_REASONS, reason
        super().__init__(f"{field}: {detail}" if field else detail)
        self.reason = reason
        self.detail = str(self)
        self.field = field


class DocumentUnavailable(DocumentError):
    """The document store failed in a way that may pass (5xx, 429, a timeout, a connection error): the
    same reference may be read on a later attempt."""

    retriable = True

    def __init__(self, detail: str, *, field: str = "") -> None:
        super().__init__("document_unreadable", detail, field=field)
        self.cause = detail


def content_type_of(head: bytes, field: str) -> str:
    kind = sniff(head)
    if kind is None:
        raise DocumentError(
            "document_unreadable",
            "not a JPEG, PNG, WebP, TIFF or PDF file (read from its bytes)",
            field=field,
        )
    return kind


@dataclass(frozen=True)
class Document:
    """One opened document: what the multipart upload needs to know before it sends a byte.

    ``filename`` is made from the field and the type (``front_image.jpg``), never the source's name.
    ``chunks()`` may be iterated any number of times; each reads the source again and raises
    :class:`DocumentError` if it yields other than ``size`` bytes or another type."""

    field: str
    filename: str
    content_type: str
    size: int
    _read: Callable[[], AsyncIterator[bytes]] = dataclass_field(repr=False, compare=False)

    async def chunks(self) -> AsyncIterator[bytes]:
        sent = 0
        head = b""
        async for chunk in self._read():
            if not chunk:
                continue
            if len(head) < SNIFF_BYTES:
                head += chunk[: SNIFF_BYTES - len(head)]
                if len(head) >= min(SNIFF_BYTES, self.size) and sniff(head) != self.content_type:
                    raise DocumentError(
                        "document_unreadable", "changed while being read (type)", field=self.field
                    )
            sent += len(chunk)
            if sent > self.size:
                raise DocumentError(
                    "document_unreadable", "changed while being read (longer)", field=self.field
                )
            yield chunk
        if sent != self.size:
            raise DocumentError("document_unreadable", "changed while being read (shorter)", field=self.field)


def make_document(
    field: str, content_type: str, size: int, read: Callable[[], AsyncIterator[bytes]]
) -> Document:
    return Document(field, f"{field}.{CONTENT_TYPES[content_type]}", content_type, size, read)


@runtime_checkable
class DocumentSource(Protocol):
    """Where documents come from. ``open`` checks the reference and the bytes' size and type without
    reading the whole document, and raises :class:`DocumentError`."""

    async def open(self, uri: str, field: str) -> Document: ...


def is_reference(value: object) -> bool:
    """True for a document reference: ``{"document": "<non-empty string>"}`` and no other key."""
    return (
        isinstance(value, Mapping)
        and len(value) == 1
        and isinstance(value.get(REFERENCE_KEY), str)
        and bool(value[REFERENCE_KEY])
    )


def references(request: Mapping[str, Any]) -> dict[str, str]:
    """``field -> uri`` for every top-level request field that holds a document reference."""
    return {name: value[REFERENCE_KEY] for name, value in request.items() if is_reference(value)}


def scheme_of(uri: str) -> str:
    head, sep, _ = uri.partition(":")
    return head.lower() if sep and head.isascii() and head.isalpha() else ""


# -- the local directory -------------------------------------------------------------------------------


class LocalDocumentSource:
    """``local:<relative path>`` under ``root``; never anything outside it, symlinks included.

    The path is resolved (symlinks followed) and must stay under the resolved root; the file is then
    opened without following a last symlink (``O_NOFOLLOW``), so a swap between the check and the open
    cannot lead outside either. Every filesystem call (the resolve, open, stat, each read of
    :data:`CHUNK_SIZE` bytes, close) runs in a worker thread, never on the event loop; the source's own
    ``limiter`` (``threads`` tokens) bounds how many run at once, so thousands of messages opening documents
    together wait for a token instead of each taking a thread."""

    def __init__(
        self, root: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES, threads: int = THREADS
    ) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.limiter = anyio.CapacityLimiter(threads)

    def _path(self, uri: str, field: str) -> Path:
        def refuse(why: str) -> DocumentError:
            return DocumentError(
                "document_unreadable", f"invalid local document reference: {why}", field=field
            )

        if scheme_of(uri) != LOCAL_SCHEME:
            raise refuse("not a local: URI")
        rel = uri.split(":", 1)[1]
        if not rel or "\x00" in rel or "\\" in rel:
            raise refuse("empty, or holds a NUL byte or a backslash")
        if rel.startswith("/") or Path(rel).is_absolute():
            raise refuse("an absolute path (use a path relative to IDV_DOCUMENTS_DIR)")
        parts = rel.split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise refuse("'.', '..' or an empty path segment")
        try:
            root = self.root.resolve(strict=True)
        except OSError:
            raise DocumentError(
                "document_missing",
                "the local document directory (IDV_DOCUMENTS_DIR) does not exist",
                field=field,
            ) from None
        target = (root / rel).resolve()  # follows symlinks; the result must still be under the root
        if not target.is_relative_to(root) or target == root:
            raise refuse("leads outside IDV_DOCUMENTS_DIR (a symlink)")
        return target

    def _stat(self, path: Path, field: str) -> tuple[int, bytes]:
        """(size, first bytes), checked: a regular file, not empty, within the limit."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise _local_error(exc, field) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise DocumentError("document_unreadable", "not a regular file", field=field)
            if info.st_size > self.max_bytes:
                raise DocumentError(
                    "document_too_large",
                    f"{info.st_size} bytes, limit is {self.max_bytes} (IDV_DOCUMENTS_MAX_BYTES)",
                    field=field,
                )
            if info.st_size == 0:
                raise DocumentError("document_unreadable", "the file is empty", field=field)
            try:
                head = os.read(fd, SNIFF_BYTES)
            except OSError as exc:
                raise _local_error(exc, field) from None
            return info.st_size, head
        finally:
            os.close(fd)

    def _check(self, uri: str, field: str) -> tuple[Path, int, bytes]:
        """The blocking part of :meth:`open` (run in a worker thread): the checked path, size, first bytes."""
        path = self._path(uri, field)
        return (path, *self._stat(path, field))

    def _open_file(self, path: Path) -> io.BufferedReader:
        return open(path, "rb", opener=_nofollow)  # closed by the reader, in a worker thread too

    async def _in_thread(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    async def open(self, uri: str, field: str) -> Document:
        path, size, head = await self._in_thread(self._check, uri, field)
        kind = content_type_of(head, field)

        async def read() -> AsyncIterator[bytes]:
            try:
                fh = await self._in_thread(self._open_file, path)
            except OSError as exc:
                raise _local_error(exc, field) from None
            try:
                while True:
                    try:
                        chunk = await self._in_thread(fh.read, CHUNK_SIZE)
                    except OSError as exc:
                        raise _local_error(exc, field) from None
                    if not chunk:
                        return
                    yield chunk
            finally:
                with anyio.CancelScope(shield=True):  # a cancelled stream still closes its file
                    await self._in_thread(fh.close)

        return make_document(field, kind, size, read)


def _nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)


def _local_error(exc: OSError, field: str) -> DocumentError:
    if exc.errno == errno.ENOENT:
        return DocumentError("document_missing", "no such document in IDV_DOCUMENTS_DIR", field=field)
    if exc.errno == errno.ELOOP:
        return DocumentError("document_unreadable", "the file is a symlink (not followed)", field=field)
    # The errno name, not strerror with a path: the path is not shown.
    name = errno.errorcode.get(exc.errno or 0, "an OS error")
    return DocumentError("document_unreadable", f"cannot read the file ({name})", field=field)


# -- routing by scheme ---------------------------------------------------------------------------------


@dataclass
class DocumentSources:
    """A :class:`DocumentSource` that hands each URI to the source registered for its scheme.

    Add a source with :meth:`register` (``sources.register("s3", S3Source(...))``); a scheme nobody
    serves is a clear ``document_unreadable``. ``aclose`` closes the sources that have one."""

    by_scheme: dict[str, DocumentSource] = dataclass_field(default_factory=dict)

    def register(self, scheme: str, source: DocumentSource) -> None:
        self.by_scheme[scheme.lower()] = source

    async def open(self, uri: str, field: str) -> Document:
        if not isinstance(uri, str) or not uri:
            raise DocumentError("document_unreadable", "the document reference is empty", field=field)
        scheme = scheme_of(uri)
        source = self.by_scheme.get(scheme)
        if source is None:
            known = ", ".join(f"{s}:" for s in sorted(self.by_scheme)) or "none configured"
            raise DocumentError(
                "document_unreadable", f"no document source for this URI scheme (known: {known})", field=field
            )
        return await source.open(uri, field)

    async def aclose(self) -> None:
        for source in {id(s): s for s in self.by_scheme.values()}.values():
            close = getattr(source, "aclose", None)
            if close is not None:
                await close()


def source_from_settings(settings: Settings) -> DocumentSources:
    """The daemon's sources: ``local:`` under ``IDV_DOCUMENTS_DIR`` and, when ``IDV_DOCUMENTS_HTTP_ALLOW``
    names URL prefixes, ``http:``/``https:`` under them."""
    from consumer.document_http import HttpDocumentSource

    sources = DocumentSources()
    if settings.documents_dir:
        sources.register(
            LOCAL_SCHEME, LocalDocumentSource(settings.documents_dir, max_bytes=settings.documents_max_bytes)
        )
    http = HttpDocumentSource(
        allow=settings.documents_http_allow_list,
        token=settings.documents_token or None,
        max_bytes=settings.documents_max_bytes,
        timeout_s=settings.documents_timeout_s,
    )
    sources.register("http", http)
    sources.register("https", http)
    return sources


async def open_documents(
    source: DocumentSource | None, request: Mapping[str, Any], fields: Sequence[str]
) -> list[Document]:
    """The documents of ``request``'s image ``fields`` (an operation's ``documents``), in that order:
    a reference is opened from ``source``, a small inline base64 string becomes an in-memory document
    (:func:`inline_document`), an absent field is skipped. For an adapter's ``prepare``: it runs before
    anything is sent, so a :class:`DocumentError` here means nothing reached the provider."""
    out = []
    for name in fields:
        value = request.get(name)
        if value is None:
            continue
        if is_reference(value):
            if source is None:
                raise DocumentError(
                    "document_unreadable",
                    "a document reference, but no document source is configured",
                    field=name,
                )
            out.append(await source.open(value[REFERENCE_KEY], name))
        elif isinstance(value, str):
            out.append(inline_document(name, value))
        else:
            raise DocumentError("document_unreadable", "neither a document reference nor base64", field=name)
    return out


def inline_document(field: str, value: str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Document:
    """A document from an inline base64 string (the small images the envelope still allows)."""
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise DocumentError(
            "document_unreadable", "the inline image is not valid base64", field=field
        ) from None
    if len(data) > max_bytes:
        raise DocumentError("document_too_large", f"{len(data)} bytes, limit is {max_bytes}", field=field)
    if not data:
        raise DocumentError("document_unreadable", "the inline image is empty", field=field)
    kind = content_type_of(data[:SNIFF_BYTES], field)

    async def read() -> AsyncIterator[bytes]:
        for start in range(0, len(data), CHUNK_SIZE):
            yield data[start : start + CHUNK_SIZE]

    return make_document(field, kind, len(data), read)


def document_error_in(exc: BaseException) -> DocumentError | None:
    """The :class:`DocumentError` behind ``exc``, if a document failed while a body was being sent.

    httpx's own transport and :mod:`consumer.http`'s raise it as it is; the ``httpx-aiohttp`` package wraps
    it in an ``httpx.TransportError`` (even a ``ConnectTimeout``). A provider client that catches transport
    errors asks this first, so a broken document is not retried as a network failure."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, DocumentError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def document_dead_letter(
    exc: DocumentError, *, attempts: int = 0, first_failure_at: float | None = None
) -> DeadLetter:
    """The dead letter for a request whose document could not be used (its ``reason`` is the error's).

    For the pipeline: a document is opened before anything is sent, so the key is released (nothing
    reached the provider) and the message set aside; an operator restores the document and redrives it.
    The detail names the field and the cause, no URI, no bytes."""
    return DeadLetter(exc.reason, exc.detail, attempts=attempts, first_failure_at=first_failure_at)
