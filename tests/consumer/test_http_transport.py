"""consumer.http.AiohttpTransport on real sockets: what goes on the wire, failures as httpx errors."""

from __future__ import annotations

import asyncio
import gzip
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from consumer.http import AiohttpTransport

pytestmark = pytest.mark.anyio

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _serve(handler: Handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


@pytest.fixture
async def transport() -> AsyncIterator[AiohttpTransport]:
    t = AiohttpTransport(max_connections=4)
    yield t
    await t.aclose()


def _request(url: str, *, read: float = 5.0) -> httpx.Request:
    return httpx.Request(
        "POST",
        url + "/v3/aml/",
        headers=[(b"content-type", b"application/json"), (b"idempotency-key", b"idv_k1")],
        content=b'{"a":1}',
        extensions={"timeout": {"connect": 2.0, "read": read, "write": 2.0, "pool": 2.0}},
    )


async def test_sends_exactly_the_request_headers_and_body(transport: AiohttpTransport) -> None:
    seen: list[tuple[bytes, bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await _read_request(reader))
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nX-Trace: t1\r\n")
        writer.write(b'Content-Length: 15\r\n\r\n{"status":"ok"}')
        await writer.drain()
        writer.close()

    server, url = await _serve(handler)
    async with server:
        response = await transport.handle_async_request(_request(url))
    assert response.status_code == 201
    assert response.content == b'{"status":"ok"}'
    assert response.headers["x-trace"] == "t1"
    ((head, body),) = seen
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /v3/aml/ HTTP/1.1"
    names = sorted(line.split(":", 1)[0].lower() for line in lines[1:] if line)
    # httpx.Request's own headers and the caller's; nothing added by aiohttp (User-Agent, Accept, ...).
    assert names == ["content-length", "content-type", "host", "idempotency-key"]
    assert body == b'{"a":1}'


async def test_a_compressed_answer_is_decoded_once(transport: AiohttpTransport) -> None:
    body = gzip.compress(b'{"status":"Approved"}')

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n")
        writer.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        writer.close()

    server, url = await _serve(handler)
    async with server:
        response = await transport.handle_async_request(_request(url))
    assert response.content == b'{"status":"Approved"}'


async def test_keeps_connections_alive_between_requests(transport: AiohttpTransport) -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while True:
                await _read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server, url = await _serve(handler)
    async with server:
        for _ in range(5):
            assert (await transport.handle_async_request(_request(url))).status_code == 200
    assert connections == 1


async def test_nothing_listening_is_a_connect_error(transport: AiohttpTransport) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(httpx.ConnectError):
        await transport.handle_async_request(_request(f"http://127.0.0.1:{port}"))


async def test_a_silent_server_is_a_read_timeout(transport: AiohttpTransport) -> None:
    release = asyncio.Event()
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await release.wait()
        writer.close()
        closed.set()

    server, url = await _serve(handler)
    async with server:
        with pytest.raises(httpx.ReadTimeout):
            await transport.handle_async_request(_request(url, read=0.2))
        release.set()
        await asyncio.wait_for(closed.wait(), 5)


async def test_a_connection_closed_before_the_answer_is_a_transport_error(
    transport: AiohttpTransport,
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.close()

    server, url = await _serve(handler)
    async with server:
        with pytest.raises(httpx.RemoteProtocolError):
            await transport.handle_async_request(_request(url))


async def test_a_garbled_answer_is_a_transport_error(transport: AiohttpTransport) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        writer.close()

    server, url = await _serve(handler)
    async with server:
        with pytest.raises(httpx.TransportError):
            await transport.handle_async_request(_request(url))


@pytest.mark.parametrize("kind", ["aiohttp", "httpx"])
@pytest.mark.parametrize(
    ("method", "body", "length"), [("POST", b'{"a":1}', "7"), ("POST", b"", "0"), ("GET", b"", None)]
)
async def test_the_provider_client_sends_the_headers_httpx_would_add(
    kind: str, method: str, body: bytes, length: str | None
) -> None:
    """ProviderExchange builds its bytes requests with Host and Content-Length given up front (httpx's own
    header pass skipped): on the wire they carry what ``httpx.Request(content=body)`` would."""
    from consumer.exchange import ProviderExchange

    seen: list[tuple[bytes, bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await _read_request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        writer.close()

    server, url = await _serve(handler)
    exchange = ProviderExchange(
        url, "k", timeout_s=5.0, max_connections=4, transport=None, transport_kind=kind
    )
    async with server, exchange:
        response = await exchange._send(method, "/v3/aml/", [(b"x-api-key", b"k")], body)
    assert response.status_code == 200
    expected = httpx.Request(method, url + "/v3/aml/", headers=[(b"x-api-key", b"k")], content=body)
    ((head, sent),) = seen
    lines = [line for line in head.decode().split("\r\n")[1:] if line]
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    assert headers["host"] == url.removeprefix("http://")
    assert headers.get("content-length") == length
    names = ("host", "content-length", "x-api-key")
    assert {k: v for k, v in headers.items() if k in names} == {
        k.lower(): v for k, v in expected.headers.items() if k.lower() in names
    }
    assert sent == body
