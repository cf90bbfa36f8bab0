"""HTTP/1.1 transport: keep-alive, pipelining, malformed input, shutdown."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import httpx
import pytest

from sandbox import FaultConfig, SandboxConfig, SandboxServer
from sandbox.testing import SandboxHarness

MakeSandbox = Callable[..., Awaitable[SandboxHarness]]

pytestmark = pytest.mark.anyio

AML = b'{"full_name":"x"}'


def _post(key: str, body: bytes = AML, api_key: str = "", extra: bytes = b"") -> bytes:
    return (
        b"POST /v3/aml/ HTTP/1.1\r\nhost: sandbox\r\nx-api-key: %s\r\nidempotency-key: %s\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s"
        % (api_key.encode(), key.encode(), len(body), extra, body)
    )


async def _exchange(port: int, data: bytes, *, then: bytes = b"") -> bytes:
    """Send ``data`` (and ``then`` after the first bytes of an answer); read until the server closes."""
    received = b""
    with anyio.fail_after(5):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(data)
            if then:
                received += await stream.receive()
                await stream.send(then)
            while True:
                try:
                    received += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return received


async def test_keep_alive_reuses_one_connection(make_sandbox: MakeSandbox) -> None:
    sandbox = await make_sandbox()
    async with httpx.AsyncClient(
        base_url=sandbox.url,
        headers={"x-api-key": sandbox.server.config.api_keys[0]},
        limits=httpx.Limits(max_connections=1),
    ) as client:
        for i in range(200):
            response = await client.post("/v3/aml/", content=AML, headers={"idempotency-key": f"k{i}"})
            assert response.status_code == 200
    assert sandbox.server.connections_accepted == 1
    assert (await sandbox.stats())["side_effects"] == 200


async def test_many_concurrent_requests(sandbox: SandboxHarness, api_key: str) -> None:
    limits = httpx.Limits(max_connections=10, max_keepalive_connections=10)
    async with httpx.AsyncClient(
        base_url=sandbox.url, headers={"x-api-key": api_key}, limits=limits
    ) as client:

        async def one(i: int) -> None:
            response = await client.post(
                "/v3/session/", json={"workflow_id": "w"}, headers={"idempotency-key": f"c{i}"}
            )
            assert response.status_code == 201

        async with anyio.create_task_group() as tg:
            for i in range(300):
                tg.start_soon(one, i)
    stats = await sandbox.stats()
    assert stats["side_effects"] == 300
    assert stats["requests"] == 300
    # The 10 pooled connections plus the fixture client's one for /_admin/stats.
    assert sandbox.server.connections_accepted <= 11


async def test_pipelined_requests_and_connection_close(sandbox: SandboxHarness, api_key: str) -> None:
    data = _post("p1", api_key=api_key) + _post("p2", api_key=api_key, extra=b"connection: close\r\n")
    received = await _exchange(sandbox.server.port, data)
    assert received.count(b"HTTP/1.1 200 OK\r\n") == 2
    assert b"connection: close" in received.lower()
    assert (await sandbox.stats())["side_effects"] == 2


async def test_http_1_0_is_answered_and_closed(sandbox: SandboxHarness) -> None:
    received = await _exchange(sandbox.server.port, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert received.endswith(b'{"status":"ok"}')


async def test_malformed_request_gets_400_and_close(sandbox: SandboxHarness) -> None:
    received = await _exchange(sandbox.server.port, b"NOT HTTP AT ALL\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 400 ")
    assert b'"bad_request"' in received
    # The server is still serving.
    assert (await sandbox.client.get("/healthz")).status_code == 200


async def test_body_too_large_is_413(make_sandbox: MakeSandbox, api_key: str) -> None:
    sandbox = await make_sandbox(max_body_bytes=100)
    received = await _exchange(sandbox.server.port, _post("big", body=b"x" * 1000, api_key=api_key))
    assert received.startswith(b"HTTP/1.1 413 ")
    assert (await sandbox.stats())["requests"] == 0


async def test_expect_100_continue(sandbox: SandboxHarness, api_key: str) -> None:
    head, _, body = _post(
        "e1", api_key=api_key, extra=b"expect: 100-continue\r\nconnection: close\r\n"
    ).partition(b"\r\n\r\n")
    received = await _exchange(sandbox.server.port, head + b"\r\n\r\n", then=body)
    assert received.startswith(b"HTTP/1.1 100 ")
    assert b"HTTP/1.1 200 OK\r\n" in received


async def test_client_disconnect_mid_request_is_harmless(sandbox: SandboxHarness, api_key: str) -> None:
    with anyio.fail_after(5):
        async with await anyio.connect_tcp("127.0.0.1", sandbox.server.port) as stream:
            await stream.send(_post("half", api_key=api_key)[:-5])
    assert (await sandbox.client.get("/healthz")).status_code == 200
    assert (await sandbox.stats())["requests"] == 0


async def test_drop_closes_only_that_connection(make_sandbox: MakeSandbox) -> None:
    sandbox = await make_sandbox(faults={"script": ["drop"]})
    with pytest.raises(httpx.TransportError):
        await sandbox.post("/v3/aml/", {"full_name": "x"}, "d")
    assert (await sandbox.post("/v3/aml/", {"full_name": "x"}, "e")).status_code == 200


async def test_stop_with_open_and_busy_connections(api_key: str) -> None:
    server = SandboxServer(SandboxConfig(api_keys=(api_key,), faults=FaultConfig(latency_ms=10_000)))
    await server.start()
    errors: list[BaseException] = []
    async with httpx.AsyncClient(base_url=server.url, headers={"x-api-key": api_key}) as client:
        assert (await client.get("/healthz")).status_code == 200  # leaves an idle keep-alive connection

        async def slow() -> None:
            try:
                await client.post("/v3/aml/", content=AML, headers={"idempotency-key": "slow"})
            except httpx.TransportError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(slow)
            with anyio.fail_after(5):
                await SandboxHarness(server, client).wait_in_flight(1)
            with anyio.fail_after(5):
                await server.stop()
    assert len(errors) == 1
    # The interrupted request stored nothing, so a retry would be processed.
    assert server.app.idempotency.in_flight == 0
    assert len(server.app.idempotency) == 0
    await server.stop()  # idempotent


async def test_start_twice_and_port_before_start() -> None:
    server = SandboxServer()
    with pytest.raises(RuntimeError):
        _ = server.port
    async with server:
        with pytest.raises(RuntimeError):
            await server.start()
        assert server.url == f"http://127.0.0.1:{server.port}"
