"""The streaming multipart body (consumer/multipart.py), read back by independent parsers: aiohttp's
multipart reader in a real aiohttp.web server on loopback, and the standard library's email parser. Sent
through every provider transport (consumer.provider.TRANSPORT_KINDS) with real multi-MB images."""

from __future__ import annotations

import email.message
import email.parser
import email.policy
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from aiohttp import BodyPartReader, web

from consumer.document_http import HttpDocumentSource
from consumer.documents import CHUNK_SIZE, Document, DocumentError, LocalDocumentSource, document_error_in
from consumer.multipart import MultipartBody, escape_name, multipart_body
from consumer.provider import TRANSPORT_KINDS, make_transport
from tests.docfiles import document_store, documents_dir, sha256
from tests.loopback import serve

pytestmark = pytest.mark.anyio


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return documents_dir(tmp_path, seed=11)


@pytest.fixture
async def documents(root: Path) -> list[Document]:
    source = LocalDocumentSource(root)
    return [
        await source.open("local:front.jpg", "front_image"),
        await source.open("local:back.png", "back_image"),
    ]


FIELDS = {
    "vendor_data": "applicant-42",
    "metadata": '{"idv_key":"idv_0123"}',
    "save_api_request": "true",
    "note": "Zoë ✓ multi\r\nline",
}


def payload(part: email.message.Message) -> bytes:
    data = part.get_payload(decode=True)
    assert isinstance(data, bytes)
    return data


async def collect(body: MultipartBody) -> tuple[bytes, int]:
    out = bytearray()
    largest = 0
    async for chunk in body:
        out += chunk
        largest = max(largest, len(chunk))
    return bytes(out), largest


@dataclass
class Parsed:
    fields: dict[str, str] = field(default_factory=dict)
    # name -> (filename, content type, sha256, size)
    files: dict[str, tuple[str, str, str, int]] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    raw_length: int = 0


@pytest.fixture
async def upload_server() -> AsyncIterator[tuple[str, list[Parsed]]]:
    """An aiohttp.web server whose handler reads each upload with aiohttp's own multipart reader."""
    seen: list[Parsed] = []

    async def handler(request: web.Request) -> web.Response:
        parsed = Parsed(headers={k.lower(): v for k, v in request.headers.items()})
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            assert isinstance(part, BodyPartReader)
            if part.filename is None:
                parsed.fields[part.name or ""] = await part.text()
                continue
            digest = hashlib.sha256()
            size = 0
            while chunk := await part.read_chunk(256 * 1024):
                digest.update(chunk)
                size += len(chunk)
            parsed.files[part.name or ""] = (
                part.filename,
                part.headers["Content-Type"],
                digest.hexdigest(),
                size,
            )
        seen.append(parsed)
        return web.json_response({"request_id": f"r{len(seen)}"})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v3/id-verification/", handler)
    async with serve(app, shutdown_timeout=0.5) as url:
        yield url, seen


def upload_request(url: str, body: MultipartBody) -> httpx.Request:
    return httpx.Request(
        "POST",
        url + "/v3/id-verification/",
        headers=[(b"x-api-key", b"k"), *body.headers()],
        content=body,
        extensions={"timeout": {"connect": 5.0, "read": 30.0, "write": 30.0, "pool": 5.0, "total": 60.0}},
    )


async def test_the_body_is_what_it_announces(documents: list[Document], root: Path) -> None:
    body = await multipart_body(FIELDS, documents)
    assert body.content_type.startswith("multipart/form-data; boundary=idv-")
    data, largest = await collect(body)
    assert len(data) == body.content_length
    assert largest <= CHUNK_SIZE + 1024  # streamed a chunk at a time, never a whole file
    assert data.count(b"--" + body.boundary.encode()) == len(FIELDS) + len(documents) + 1
    assert data.endswith(b"--" + body.boundary.encode() + b"--\r\n")
    again, _ = await collect(body)  # re-iterable: a retry streams the same bytes again
    assert again == data
    assert (root / "front.jpg").read_bytes() in data and (root / "back.png").read_bytes() in data
    assert (await multipart_body(FIELDS, documents)).boundary != body.boundary


async def test_the_stdlib_email_parser_reads_it(documents: list[Document], root: Path) -> None:
    body = await multipart_body(FIELDS, documents)
    data, _ = await collect(body)
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + body.content_type.encode() + b"\r\n\r\n" + data
    )
    assert message.is_multipart() and not message.defects
    parts = list(message.iter_parts())
    assert [p.get_param("name", header="content-disposition") for p in parts] == [
        *FIELDS,
        "front_image",
        "back_image",
    ]
    for part, (name, value) in zip(parts, FIELDS.items(), strict=False):
        assert part.get_filename() is None
        assert payload(part).decode() == value, name
    front, back = parts[len(FIELDS) :]
    assert (front.get_filename(), front.get_content_type()) == ("front_image.jpg", "image/jpeg")
    assert (back.get_filename(), back.get_content_type()) == ("back_image.png", "image/png")
    assert sha256(payload(front)) == sha256((root / "front.jpg").read_bytes())
    assert sha256(payload(back)) == sha256((root / "back.png").read_bytes())


@pytest.mark.parametrize("kind", TRANSPORT_KINDS)
async def test_every_provider_transport_streams_it_with_a_content_length(
    kind: str, documents: list[Document], root: Path, upload_server: tuple[str, list[Parsed]]
) -> None:
    url, seen = upload_server
    transport = make_transport(kind, httpx.Limits(max_connections=4))
    body = await multipart_body(FIELDS, documents)
    try:
        for _ in range(2):  # the same body object twice, as a retry would send it
            response = await transport.handle_async_request(upload_request(url, body))
            await response.aread()
            assert response.status_code == 200, response.content
    finally:
        await transport.aclose()
    assert len(seen) == 2 and seen[0] == seen[1]
    parsed = seen[0]
    assert parsed.headers["content-length"] == str(body.content_length)
    assert "transfer-encoding" not in parsed.headers
    assert parsed.headers["content-type"] == body.content_type
    assert parsed.fields == FIELDS
    front = (root / "front.jpg").read_bytes()
    back = (root / "back.png").read_bytes()
    assert parsed.files == {
        "front_image": ("front_image.jpg", "image/jpeg", sha256(front), len(front)),
        "back_image": ("back_image.png", "image/png", sha256(back), len(back)),
    }


async def test_documents_from_the_http_store_are_uploaded_too(
    root: Path, upload_server: tuple[str, list[Parsed]]
) -> None:
    url, seen = upload_server
    async with document_store(root) as store:
        source = HttpDocumentSource(allow=[store.url + "/docs/", store.url + "/chunked/"])
        transport = make_transport("aiohttp", httpx.Limits(max_connections=4))
        try:
            docs = [
                await source.open(store.url + "/docs/front.jpg", "front_image"),
                await source.open(store.url + "/chunked/back.png", "back_image"),
            ]
            body = await multipart_body({"vendor_data": "applicant-1"}, docs)
            response = await transport.handle_async_request(upload_request(url, body))
            await response.aread()
        finally:
            await transport.aclose()
            await source.aclose()
    assert response.status_code == 200
    (parsed,) = seen
    assert parsed.files["front_image"][2] == sha256((root / "front.jpg").read_bytes())
    assert parsed.files["back_image"][2] == sha256((root / "back.png").read_bytes())


@pytest.mark.parametrize("kind", TRANSPORT_KINDS)
async def test_a_document_failing_mid_stream_raises_its_own_error(
    kind: str, documents: list[Document], root: Path, upload_server: tuple[str, list[Parsed]]
) -> None:
    """A document that shrank after it was opened: the upload stops with DocumentError (not a transport
    error that would be retried as a network failure), and the server never sees a complete body."""
    url, seen = upload_server
    body = await multipart_body(FIELDS, documents)
    data = (root / "front.jpg").read_bytes()
    (root / "front.jpg").write_bytes(data[: len(data) // 2])
    transport = make_transport(kind, httpx.Limits(max_connections=4))
    try:
        with pytest.raises(Exception) as info:  # which type depends on the transport: below
            await transport.handle_async_request(upload_request(url, body))
    finally:
        await transport.aclose()
    if kind == "httpx-aiohttp":
        # That package wraps every aiohttp error in an httpx one (even ConnectTimeout, PITFALLS); the cause
        # is still there, for the provider client to find.
        assert isinstance(info.value, httpx.TransportError)
    else:
        assert isinstance(info.value, DocumentError)
    found = document_error_in(info.value)
    assert found is not None and str(found) == "front_image: changed while being read (shorter)"
    assert found.reason == "document_unreadable"
    assert document_error_in(httpx.ReadError("x")) is None
    assert seen == []


def test_names_are_escaped_so_no_value_breaks_out() -> None:
    assert escape_name('a"b') == b"a%22b"
    assert escape_name("a\r\nContent-Type: text/html") == b"a%0D%0AContent-Type: text/html"
    assert escape_name("Zoë") == "Zoë".encode()


async def test_hostile_names_stay_inside_their_part(
    upload_server: tuple[str, list[Parsed]], root: Path
) -> None:
    url, seen = upload_server
    source = LocalDocumentSource(root)
    evil = 'x"; filename="evil.sh'
    crlf = "y\r\nContent-Type: text/html\r\n\r\n--"
    doc = await source.open("local:front.jpg", 'front"\r\nX-Injected: 1')
    body = await multipart_body({evil: "v1", crlf: "v2"}, [doc])
    data, _ = await collect(body)
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + body.content_type.encode() + b"\r\n\r\n" + data
    )
    parts = list(message.iter_parts())
    assert len(parts) == 3
    assert [p.get_param("name", header="content-disposition") for p in parts] == [
        "x%22; filename=%22evil.sh",
        "y%0D%0AContent-Type: text/html%0D%0A%0D%0A--",
        "front%22%0D%0AX-Injected: 1",
    ]
    assert parts[0].get_filename() is None and "X-Injected" not in parts[2]
    transport = make_transport("aiohttp", httpx.Limits(max_connections=2))
    try:
        response = await transport.handle_async_request(upload_request(url, body))
        await response.aread()
    finally:
        await transport.aclose()
    (parsed,) = seen
    assert parsed.fields == {
        "x%22; filename=%22evil.sh": "v1",
        "y%0D%0AContent-Type: text/html%0D%0A%0D%0A--": "v2",
    }
    assert list(parsed.files) == ["front%22%0D%0AX-Injected: 1"]


async def test_fields_only_and_bad_values() -> None:
    body = await multipart_body({"a": "1"}, [])
    data, _ = await collect(body)
    assert len(data) == body.content_length
    delimiter = f"--{body.boundary}"
    expected = f'{delimiter}\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n{delimiter}--\r\n'
    assert data == expected.encode()
    with pytest.raises(TypeError, match="must be a str"):
        await multipart_body({"a": 1}, [])  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="boundary"):
        MultipartBody({}, [], boundary="x" * 71)
    assert "applicant" not in repr(await multipart_body({"vendor_data": "applicant-1"}, []))
