"""The HTTP(S) document source: documents referenced by URL, fetched from a document store with httpx.

Only URLs under a configured prefix (``IDV_DOCUMENTS_HTTP_ALLOW``: same scheme, host and port, and a path
under the prefix's path) are fetched: a message must not make the daemon read an arbitrary URL (an
internal service, a cloud metadata endpoint) and upload the answer to the provider, and the bearer token
(``IDV_DOCUMENTS_TOKEN`` / ``_FILE``) goes to those stores only. Redirects are not followed.

:meth:`HttpDocumentSource.open` sends a streaming GET and reads only what it must: the ``Content-Length``
(refused over ``IDV_DOCUMENTS_MAX_BYTES`` before any body byte), the first bytes for the type; a store
that answers without a length is read through once, counting, and the bytes discarded. Each
:meth:`Document.chunks` streams a fresh GET, so no document is held in memory or written to disk here.

Answers: 200 → the document; 404 / 410 → ``document_missing``; 413 → ``document_too_large``; 408, 425,
429, 5xx, timeouts and connection errors → :class:`DocumentUnavailable` (retriable: ``open`` tries again,
3 attempts by default, then raises it); any other status, a redirect, an unknown type →
``document_unreadable`` (terminal). See :mod:`consumer.documents`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import anyio
import httpx

from consumer.documents import (
    DEFAULT_MAX_BYTES,
    SNIFF_BYTES,
    Document,
    DocumentError,
    DocumentUnavailable,
    content_type_of,
    make_document,
)

__all__ = ["HttpDocumentSource", "parse_allow_list"]

_RETRIABLE_STATUS = frozenset({408, 425, 429})


def parse_allow_list(prefixes: Sequence[str]) -> list[httpx.URL]:
    """The allowed URL prefixes, each an absolute http(s) URL whose path ends with ``/``; ``ValueError``
    for one that is not."""
    allowed = []
    for raw in prefixes:
        url = httpx.URL(raw.strip())
        if url.scheme not in ("http", "https") or not url.host or url.userinfo or url.query or url.fragment:
            raise ValueError(f"not an http(s) URL prefix without credentials, query or fragment: {raw!r}")
        if not url.path.endswith("/"):
            url = url.copy_with(path=url.path + "/")
        allowed.append(url)
    return allowed


class HttpDocumentSource:
    def __init__(
        self,
        *,
        allow: Sequence[str] = (),
        token: str | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        timeout_s: float = 30.0,
        attempts: int = 3,
        backoff_s: float = 0.2,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.allow = parse_allow_list(allow)
        self.max_bytes = max_bytes
        self.attempts = max(1, attempts)
        self.backoff_s = backoff_s
        # identity: the bytes counted, typed and uploaded are the document's own, and Content-Length is
        # their length (a compressed answer would be neither).
        headers = {"user-agent": "idv-exactly-once/0.1 (documents)", "accept-encoding": "identity"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        # Made on first use: the client's pool belongs to the running event loop.
        self._client: httpx.AsyncClient | None = None
        self._client_args = {
            "headers": headers,
            "timeout": httpx.Timeout(timeout_s),
            "follow_redirects": False,
            "transport": transport,
        }

    def _allowed(self, uri: str, field: str) -> httpx.URL:
        def refuse(why: str) -> DocumentError:
            return DocumentError("document_unreadable", why, field=field)

        try:
            url = httpx.URL(uri)
        except (httpx.InvalidURL, ValueError):
            raise refuse("the document URL is not a valid URL") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise refuse("the document URL is not an absolute http(s) URL")
        if url.userinfo or url.fragment:
            raise refuse("the document URL carries credentials or a fragment")
        raw_path = url.raw_path.split(b"?", 1)[0].lower()
        # Encoded dots and slashes are decoded by some servers after our prefix check: refuse them.
        if b"%2e" in raw_path or b"%2f" in raw_path or b"%5c" in raw_path or b"/../" in raw_path + b"/":
            raise refuse("the document URL's path holds '..' or encoded dots or slashes")
        for prefix in self.allow:
            if (
                url.scheme == prefix.scheme
                and url.host == prefix.host
                and url.port == prefix.port
                and url.path.startswith(prefix.path)
                and len(url.path) > len(prefix.path)
            ):
                return url
        if not self.allow:
            raise refuse(
                "HTTP(S) document references are off (set IDV_DOCUMENTS_HTTP_ALLOW to the store's URL)"
            )
        raise refuse("the document URL is not under an allowed prefix (IDV_DOCUMENTS_HTTP_ALLOW)")

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(**self._client_args)  # type: ignore[arg-type]
        return self._client

    @asynccontextmanager
    async def _get(self, url: httpx.URL, field: str) -> AsyncIterator[httpx.Response]:
        """A streaming GET whose answer is 200, or the matching :class:`DocumentError`."""
        try:
            async with self._http().stream("GET", url) as response:
                status = response.status_code
                if status == 200:
                    if response.headers.get("content-encoding", "identity").lower() != "identity":
                        raise DocumentError(
                            "document_unreadable",
                            "the document store sent it compressed (Content-Encoding) though asked not to",
                            field=field,
                        )
                    yield response
                    return
                if status in (404, 410):
                    raise DocumentError(
                        "document_missing", f"the document store answered HTTP {status}", field=field
                    )
                if status == 413:
                    raise DocumentError(
                        "document_too_large", "the document store answered HTTP 413", field=field
                    )
                if status in _RETRIABLE_STATUS or status >= 500:
                    raise DocumentUnavailable(f"the document store answered HTTP {status}", field=field)
                what = "a redirect (not followed)" if 300 <= status < 400 else f"HTTP {status}"
                raise DocumentError("document_unreadable", f"the document store answered {what}", field=field)
        except httpx.TimeoutException:
            raise DocumentUnavailable("the document store did not answer in time", field=field) from None
        except httpx.TransportError as exc:
            raise DocumentUnavailable(
                f"cannot reach the document store ({type(exc).__name__})", field=field
            ) from None

    def _announced(self, response: httpx.Response, field: str) -> int | None:
        raw = response.headers.get("content-length")
        if raw is None:
            return None
        try:
            size = int(raw)
        except ValueError:
            raise DocumentError(
                "document_unreadable", "the store sent an invalid Content-Length", field=field
            ) from None
        if size > self.max_bytes:
            raise DocumentError(
                "document_too_large", f"{size} bytes, limit is {self.max_bytes} (IDV_DOCUMENTS_MAX_BYTES)",
                field=field,
            )
        return size

    async def open(self, uri: str, field: str) -> Document:
        """Check the reference and the document; a store failure that may pass (:class:`DocumentUnavailable`)
        is tried again, ``attempts`` times in all with a doubling pause, before it is raised."""
        url = self._allowed(uri, field)
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                return await self._open(url, field)
            except DocumentUnavailable as exc:
                if attempt == self.attempts:
                    raise DocumentUnavailable(f"{exc.cause} ({attempt} attempts)", field=field) from None
            await anyio.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    async def _open(self, url: httpx.URL, field: str) -> Document:
        head = b""
        async with self._get(url, field) as response:
            size = self._announced(response, field)
            counted = 0
            try:
                async for chunk in response.aiter_raw():
                    if len(head) < SNIFF_BYTES:
                        head += chunk[: SNIFF_BYTES - len(head)]
                    counted += len(chunk)
                    if size is not None and len(head) >= SNIFF_BYTES:
                        break  # the length is known; the rest is read when the document is sent
                    if counted > self.max_bytes:
                        raise DocumentError(
                            "document_too_large",
                            f"more than {self.max_bytes} bytes (IDV_DOCUMENTS_MAX_BYTES)",
                            field=field,
                        )
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                raise DocumentUnavailable(
                    f"the document store's answer broke off ({type(exc).__name__})", field=field
                ) from None
        if size is None:
            size = counted
        if size == 0:
            raise DocumentError("document_unreadable", "the document is empty", field=field)
        kind = content_type_of(head, field)

        async def read() -> AsyncIterator[bytes]:
            async with self._get(url, field) as again:
                try:
                    async for chunk in again.aiter_raw():
                        yield chunk
                except (httpx.TimeoutException, httpx.TransportError) as exc:
                    raise DocumentUnavailable(
                        f"the document store's answer broke off ({type(exc).__name__})", field=field
                    ) from None

        return make_document(field, kind, size, read)

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()
