from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from consumer.errors import ConfigurationError
from consumer.health import HealthServer, PartitionProgress, readiness_report
from consumer.metrics import Metrics

pytestmark = pytest.mark.anyio


# -- readiness logic -----------------------------------------------------------------------------------


def report(**overrides: Any) -> tuple[bool, dict[str, Any]]:
    args: dict[str, Any] = dict(
        assigned=4, broker_ok=True, store_ok=True, partition_progress={"t/0": (100.0, 0), "t/1": (100.0, 0)},
        now=100.0, stall_after_s=60.0,
    )  # fmt: skip
    args.update(overrides)
    return readiness_report(**args)


def test_ready_when_assigned_reachable_and_moving() -> None:
    ready, details = report()
    assert ready
    assert details == {
        "ready": True,
        "assigned_partitions": 4,
        "broker": "ok",
        "store": "ok",
        "stalled_partitions": {},
        "reasons": [],
    }


def test_not_ready_without_partitions_unless_none_are_expected() -> None:
    ready, details = report(assigned=0, partition_progress={})
    assert not ready
    assert details["reasons"] == ["no partitions assigned"]
    # More instances than partitions: a standby with nothing assigned is healthy.
    ready, _ = report(assigned=0, partition_progress={}, require_assignment=False)
    assert ready


@pytest.mark.parametrize(
    ("broker_ok", "store_ok", "reason"),
    [(False, True, "Kafka broker unreachable"), (True, False, "dedupe store unreachable")],
)
def test_not_ready_when_a_dependency_is_unreachable(broker_ok: bool, store_ok: bool, reason: str) -> None:
    ready, details = report(broker_ok=broker_ok, store_ok=store_ok)
    assert not ready
    assert details["reasons"] == [reason]


def test_a_partition_with_pending_work_and_no_progress_is_stalled() -> None:
    # quix-streams #1124: one partition silently stops while the process, the broker and the store are fine.
    progress = {"t/0": (1000.0, 0), "t/1": (1000.0, 3), "t/2": (1055.0, 2)}
    ready, details = report(partition_progress=progress, now=1060.0, stall_after_s=60.0)
    assert not ready
    assert details["stalled_partitions"] == {"t/1": {"pending": 3, "stalled_s": 60.0}}
    assert details["reasons"] == ["partition t/1 stalled: 3 pending, no progress for 60.0s"]


def test_idle_partitions_are_never_stalled_however_old() -> None:
    ready, _ = report(partition_progress={"t/0": (0.0, 0)}, now=1_000_000.0, stall_after_s=60.0)
    assert ready


def test_pending_work_that_progressed_recently_is_fine() -> None:
    ready, _ = report(partition_progress={"t/0": (1000.0, 500)}, now=1059.9, stall_after_s=60.0)
    assert ready


def test_every_reason_is_listed() -> None:
    ready, details = report(
        assigned=0, broker_ok=False, store_ok=False, partition_progress={"b/1": (0.0, 1), "a/0": (0.0, 2)},
        now=100.0, stall_after_s=10.0,
    )  # fmt: skip
    assert not ready
    assert details["reasons"] == [
        "no partitions assigned",
        "Kafka broker unreachable",
        "dedupe store unreachable",
        "partition a/0 stalled: 2 pending, no progress for 100.0s",
        "partition b/1 stalled: 1 pending, no progress for 100.0s",
    ]


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_partition_progress_tracks_what_readiness_needs() -> None:
    clock = Clock()
    p = PartitionProgress(clock)
    p.started("t", 0)
    assert p.snapshot() == {"t/0": (0.0, 1)}
    clock.t = 30.0
    p.finished("t", 0)
    assert p.snapshot() == {"t/0": (30.0, 0)}
    # Idle for an hour, then a message arrives: the wait starts now, not an hour ago.
    clock.t = 3630.0
    p.started("t", 0)
    assert p.snapshot() == {"t/0": (3630.0, 1)}
    assert readiness_report(1, True, True, p.snapshot(), clock.t + 1, 60.0)[0]
    # More work arriving at a busy partition is not progress.
    clock.t = 3660.0
    p.started("t", 0)
    assert p.snapshot() == {"t/0": (3630.0, 2)}
    ready, details = readiness_report(1, True, True, p.snapshot(), 3690.0, 60.0)
    assert not ready
    assert details["stalled_partitions"] == {"t/0": {"pending": 2, "stalled_s": 60.0}}
    p.finished("t", 0)
    assert readiness_report(1, True, True, p.snapshot(), 3690.0, 60.0)[0]
    p.remove("t", 0)
    p.finished("t", 0)  # a late finish for a revoked partition is ignored
    assert p.snapshot() == {}


# -- HTTP ----------------------------------------------------------------------------------------------


class ReadinessStub:
    def __init__(self) -> None:
        self.answer: tuple[bool, dict[str, Any]] = (True, {"ready": True})
        self.error: Exception | None = None
        self.calls = 0

    def __call__(self) -> tuple[bool, dict[str, Any]]:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.answer


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def readiness() -> ReadinessStub:
    return ReadinessStub()


@pytest.fixture
async def server(metrics: Metrics, readiness: ReadinessStub) -> AsyncIterator[HealthServer]:
    server = HealthServer("127.0.0.1", 0, metrics, readiness)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        yield server
        tg.cancel_scope.cancel()


@pytest.fixture
async def client(server: HealthServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=5.0) as client:
        yield client


async def test_healthz(client: httpx.AsyncClient) -> None:
    r = await client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}
    assert r.headers["cache-control"] == "no-store"


async def test_metrics_in_prometheus_text_format(client: httpx.AsyncClient, metrics: Metrics) -> None:
    metrics.consumed("idv.requests", 2)
    metrics.finished("completed", "approved")
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    (sample,) = families["idv_messages_consumed"].samples
    assert sample.labels == {"topic": "idv.requests", "partition": "2"}
    assert sample.value == 1.0
    metrics.consumed("idv.requests", 2)  # every scrape renders the current values
    assert (
        'idv_messages_consumed_total{partition="2",topic="idv.requests"} 2.0'
        in (await client.get("/metrics")).text
    )


async def test_readyz_200_and_503_with_the_details(
    client: httpx.AsyncClient, readiness: ReadinessStub
) -> None:
    readiness.answer = (True, {"ready": True, "assigned_partitions": 3})
    r = await client.get("/readyz")
    assert (r.status_code, r.json()) == (200, {"ready": True, "assigned_partitions": 3})
    readiness.answer = readiness_report(2, True, True, {"t/1": (0.0, 5)}, 120.0, 60.0)
    r = await client.get("/readyz")
    assert r.status_code == 503
    assert r.headers["content-type"] == "application/json"
    assert r.json()["stalled_partitions"] == {"t/1": {"pending": 5, "stalled_s": 120.0}}
    assert readiness.calls == 2  # asked on every request, never cached


async def test_readyz_503_when_the_check_itself_fails(
    client: httpx.AsyncClient, readiness: ReadinessStub
) -> None:
    readiness.error = RuntimeError("boom")
    r = await client.get("/readyz")
    assert r.status_code == 503
    assert r.json() == {"ready": False, "reasons": ["readiness check failed: RuntimeError"]}
    readiness.error = None
    assert (await client.get("/readyz")).status_code == 200  # the server survived


async def test_unknown_path_method_and_head(client: httpx.AsyncClient) -> None:
    assert (await client.get("/nope")).status_code == 404
    r = await client.post("/metrics", content=b"x")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, HEAD"
    r = await client.head("/healthz")
    assert r.status_code == 200
    assert r.content == b""
    assert int(r.headers["content-length"]) > 0
    assert (await client.get("/healthz?verbose=1")).status_code == 200


async def test_an_endpoint_error_is_a_500_not_a_dead_server(
    client: httpx.AsyncClient,
    metrics: Metrics,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken() -> bytes:
        raise RuntimeError("collector failed")

    monkeypatch.setattr(metrics, "render", broken)
    r = await client.get("/metrics")
    assert (r.status_code, r.json()) == (500, {"error": "internal"})
    assert "health endpoint failed to answer /metrics" in caplog.text
    assert (await client.get("/healthz")).status_code == 200


async def raw_exchange(server: HealthServer, payload: bytes, until: Callable[[bytes], bool]) -> bytes:
    async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
        await stream.send(payload)
        data = b""
        with anyio.fail_after(5):
            while not until(data):
                try:
                    data += await stream.receive()
                except anyio.EndOfStream:
                    break
        return data


async def test_keep_alive_and_pipelined_requests_on_one_connection(server: HealthServer) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    data = await raw_exchange(server, request * 3, lambda d: d.count(b'{"status":"ok"}') == 3)
    assert data.count(b"HTTP/1.1 200 OK") == 3


async def test_malformed_request_gets_400_and_the_connection_closes(server: HealthServer) -> None:
    data = await raw_exchange(server, b"NONSENSE\r\n\r\n", lambda d: False)
    # aiohttp answers an unparsable request line as HTTP/1.0 (h11 said HTTP/1.1); then closes (EOF above).
    assert data.startswith((b"HTTP/1.0 400 ", b"HTTP/1.1 400 "))


async def test_metrics_disabled_and_readiness_absent() -> None:
    server = HealthServer("127.0.0.1", 0)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        async with httpx.AsyncClient(base_url=server.url) as client:
            assert (await client.get("/metrics")).status_code == 404
            assert (await client.get("/readyz")).status_code == 200
        tg.cancel_scope.cancel()


async def test_defaults_bind_loopback_and_reports_the_port() -> None:
    server = HealthServer(port=0)
    assert server.host == "127.0.0.1"
    with pytest.raises(RuntimeError, match="not bound"):
        _ = server.port
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.serve)
        assert port == server.port > 0
        assert server.url == f"http://127.0.0.1:{port}"
        tg.cancel_scope.cancel()


async def test_stops_with_its_task_group() -> None:
    server = HealthServer("127.0.0.1", 0)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        port = server.port
        tg.cancel_scope.cancel()
    with pytest.raises(OSError):
        await anyio.connect_tcp("127.0.0.1", port)


async def test_a_port_in_use_is_a_configuration_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        message = rf"IDV_HEALTH_PORT: cannot listen on 127.0.0.1:{port} \(Address already in use\)"
        # Bound before any task group: the error arrives as itself, for the CLI's one-line message.
        with pytest.raises(ConfigurationError, match=message):
            async with HealthServer("127.0.0.1", port):
                pass
        # Through tg.start() it still surfaces, inside the task group's exception group.
        seen: list[BaseException] = []
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(HealthServer("127.0.0.1", port).serve)
        except* ConfigurationError as group:
            seen.extend(group.exceptions)
        assert len(seen) == 1


async def test_bind_then_serve_in_a_task_group() -> None:
    async with HealthServer("127.0.0.1", 0) as server:
        port = server.port  # known before serving: can be logged or registered first
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve)
            async with httpx.AsyncClient() as client:
                assert (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
            tg.cancel_scope.cancel()
    with pytest.raises(OSError):
        await anyio.connect_tcp("127.0.0.1", port)


# -- limits: connection cap, connection lifetime, file descriptors running out ---------------------------


async def test_connections_over_the_cap_get_503_and_the_server_recovers() -> None:
    server = HealthServer("127.0.0.1", 0, max_connections=4)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        held = [await anyio.connect_tcp("127.0.0.1", server.port) for _ in range(4)]
        await anyio.sleep(0.2)  # let them be set up
        extra = await raw_exchange(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", lambda d: False)
        assert extra.startswith(b"HTTP/1.1 503 ") and b"too_many_clients" in extra
        assert server.refused >= 1
        for stream in held:
            await stream.aclose()
        await anyio.sleep(0.2)
        async with httpx.AsyncClient(base_url=server.url) as client:
            assert (await client.get("/healthz")).status_code == 200
        tg.cancel_scope.cancel()


async def test_a_client_trickling_a_request_is_cut_off() -> None:
    server = HealthServer("127.0.0.1", 0, connection_lifetime_s=0.5)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
            await stream.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # ... and never the blank line
            with anyio.fail_after(5):  # closed by the server after its lifetime (+ grace)
                try:
                    while await stream.receive():
                        pass
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    pass
        tg.cancel_scope.cancel()


async def test_idle_keep_alive_connections_are_closed() -> None:
    server = HealthServer("127.0.0.1", 0, idle_timeout_s=0.3)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        data = b""
        async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
            await stream.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            with anyio.fail_after(5):
                try:
                    while True:
                        data += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    pass
        assert data.startswith(b"HTTP/1.1 200 ")
        tg.cancel_scope.cancel()


async def test_serve_never_raises_after_bind(monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon runs serve() in its own task group: a failure there must not stop processing."""
    server = HealthServer("127.0.0.1", 0)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)

        async def broken_shutdown(*_: object) -> None:
            raise RuntimeError("shutdown failed")

        assert server._server is not None
        monkeypatch.setattr(server._server, "shutdown", broken_shutdown)
        # A handler failing with something unexpected is a 500 on that request, nothing more.
        monkeypatch.setattr(server, "_route", lambda *_: (_ for _ in ()).throw(MemoryError()))
        async with httpx.AsyncClient(base_url=server.url) as client:
            r = await client.get("/healthz")
            assert r.status_code == 500
        tg.cancel_scope.cancel()  # closing fails: logged, not raised


_EMFILE_CHILD = r"""
import resource, sys, anyio
from consumer.health import HealthServer

async def main() -> None:
    server = HealthServer("127.0.0.1", 0, max_connections=10_000)
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.serve)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        print(port, flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)  # the parent says when to stop
        tg.cancel_scope.cancel()
    print("served to the end", flush=True)

anyio.run(main, backend_options={"use_uvloop": sys.argv[1] == "uvloop"})
"""


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_running_out_of_file_descriptors_does_not_stop_the_endpoint(loop: str, tmp_path: Path) -> None:
    """EMFILE on accept: the server keeps going and answers again once descriptors are free.

    The child serves with a 64-descriptor limit; 120 client connections exhaust it (asyncio then logs
    "out of system resource" and pauses accepting for a second; libuv sheds connections).
    """
    import subprocess
    import sys

    err_path = tmp_path / "child.err"
    with err_path.open("wb") as err:  # a file, not a pipe: a full pipe would block the child's logging
        proc = subprocess.Popen(  # noqa: ASYNC220 - instant; every wait below is in a thread
            [sys.executable, "-c", _EMFILE_CHILD, loop],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        port = int(await anyio.to_thread.run_sync(proc.stdout.readline))

        def connect_many() -> list[socket.socket]:
            held: list[socket.socket] = []
            for _ in range(120):
                try:
                    held.append(socket.create_connection(("127.0.0.1", port), timeout=2))
                except OSError:  # the listen backlog is full: enough
                    break
            return held

        held = await anyio.to_thread.run_sync(connect_many)
        try:
            assert len(held) > 64
            await anyio.sleep(1.5)
            assert proc.poll() is None, err_path.read_text()
        finally:
            for sock in held:
                sock.close()
        url = f"http://127.0.0.1:{port}/healthz"
        async with httpx.AsyncClient(timeout=2.0) as client:
            with anyio.fail_after(20):
                while True:
                    try:
                        if (await client.get(url)).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    await anyio.sleep(0.2)
        assert proc.poll() is None
        proc.stdin.write(b"\n")
        proc.stdin.flush()
        out = await anyio.to_thread.run_sync(proc.stdout.read)
        assert b"served to the end" in out
        assert await anyio.to_thread.run_sync(proc.wait) == 0
        if loop == "asyncio":
            assert "out of system resource" in err_path.read_text()  # EMFILE did happen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
