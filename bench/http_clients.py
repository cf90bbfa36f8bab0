"""HTTP clients against the sandbox provider at high concurrency: requests/s and client CPU per request.

    python bench/http_clients.py                       # 20 ms latency; 16/64/128/256 in flight
    python bench/http_clients.py --concurrency 64,256 --seconds 8

For each client and each number of requests in flight, ``C`` tasks POST a realistic request body to
``/v3/aml/`` with a fresh ``Idempotency-Key`` each, back to back, for ``--seconds`` after a warm-up (so
connection set-up is not measured). Clients:

* ``httpx``: one ``httpx.AsyncClient`` with a pool of ``C`` connections (what ``ProviderClient`` uses);
* ``httpx rr×N``: ``N`` clients of at most 32 connections each, round-robin (PITFALLS: httpx degrades
  past ~64 concurrent requests on one client, httpx #3215, httpcore #924);
* ``httpx-aiohttp``: one ``httpx.AsyncClient`` on ``httpx_aiohttp.AiohttpTransport`` (same httpx API);
* ``aiohttp``: a bare ``aiohttp.ClientSession``, the reference;
* ``ProviderClient(httpx)`` / ``ProviderClient(aiohttp)``: the daemon's own client, both transports
  (the second only if ``consumer.provider`` has ``transport_kind``);
* ``ProviderClient(native)``: the same ``call()`` on ``bench/native_aiohttp.py`` (aiohttp without httpx),
  a prototype of a proposed change.

``load`` is the CPU (in cores) used by every other process on the machine meanwhile: the numbers are only
comparable between rows with similar load.

The sandbox runs as its own process with a fresh ledger per measurement; its CPU share is printed too,
because on a 2-core machine it competes with the client (it serves ~3,000 req/s to a raw keep-alive
client, which is the ceiling here, not 1000 x C / latency).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import inspect
import itertools
import math
import resource
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import API_KEY, Sandbox, workdir
from consumer.provider import ProviderClient
from producer.envelope import get_operation

BODY = (
    b'{"full_name":"Sample Person 000042","date_of_birth":"1980-01-01","nationality":"ZZ",'
    b'"document_number":"TEST00000042","vendor_data":"sample-000042"}'
)
PATH = "/v3/aml/"

Send = Callable[[], Awaitable[int]]


def _key() -> str:
    return "idv_" + uuid.uuid4().hex


def _headers() -> dict[str, str]:
    return {"x-api-key": API_KEY, "Idempotency-Key": _key(), "content-type": "application/json"}


def _limits(n: int) -> httpx.Limits:
    return httpx.Limits(max_connections=n, max_keepalive_connections=n)


def _httpx_sender(pick: Callable[[], httpx.AsyncClient]) -> Send:
    """One request of the benchmark on the client ``pick()`` returns; its status code."""

    async def send() -> int:
        r = await pick().post(PATH, content=BODY, headers=_headers())
        return r.status_code

    return send


@contextlib.asynccontextmanager
async def httpx_single(url: str, c: int):  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(base_url=url, limits=_limits(c), timeout=30) as client:
        yield _httpx_sender(lambda: client)


@contextlib.asynccontextmanager
async def httpx_round_robin(url: str, c: int):  # type: ignore[no-untyped-def]
    n = max(2, math.ceil(c / 32))
    clients = [
        httpx.AsyncClient(base_url=url, limits=_limits(math.ceil(c / n)), timeout=30) for _ in range(n)
    ]
    turn = itertools.cycle(clients)
    try:
        yield _httpx_sender(lambda: next(turn))
    finally:
        for client in clients:
            await client.aclose()


@contextlib.asynccontextmanager
async def httpx_aiohttp(url: str, c: int):  # type: ignore[no-untyped-def]
    from httpx_aiohttp import AiohttpTransport

    transport = AiohttpTransport(limits=_limits(c))
    async with httpx.AsyncClient(base_url=url, transport=transport, timeout=30) as client:
        yield _httpx_sender(lambda: client)


@contextlib.asynccontextmanager
async def aiohttp_bare(url: str, c: int):  # type: ignore[no-untyped-def]
    import aiohttp

    connector = aiohttp.TCPConnector(limit=c)
    async with aiohttp.ClientSession(base_url=url, connector=connector) as session:

        async def send() -> int:
            async with session.post(PATH, data=BODY, headers=_headers()) as r:
                await r.read()
                return r.status

        yield send


def _provider_client(kind: str):  # type: ignore[no-untyped-def]
    @contextlib.asynccontextmanager
    async def factory(url: str, c: int):  # type: ignore[no-untyped-def]
        kwargs = {"transport_kind": kind} if kind not in ("httpx", "aiohttp-native") else {}
        client = ProviderClient(url, API_KEY, max_connections=c, **kwargs)  # type: ignore[arg-type]
        if kind == "aiohttp-native":
            from bench import native_aiohttp

            native_aiohttp.install(client, timeout_s=10.0, max_connections=c)
        operation = get_operation("aml_screening")
        request = {
            "full_name": "Sample Person 000042",
            "date_of_birth": "1980-01-01",
            "nationality": "ZZ",
            "document_number": "TEST00000042",
            "vendor_data": "sample-000042",
        }
        async with client:

            async def send() -> int:
                result = await client.call(operation, request, _key())
                return result.outcome.http_status or 0

            yield send

    return factory


def clients() -> dict[str, Callable[[str, int], contextlib.AbstractAsyncContextManager[Send]]]:
    out: dict[str, Callable[[str, int], contextlib.AbstractAsyncContextManager[Send]]] = {
        "httpx": httpx_single,
        "httpx rr (≤32/client)": httpx_round_robin,
        "httpx-aiohttp": httpx_aiohttp,
        "aiohttp (bare)": aiohttp_bare,
        "ProviderClient(httpx)": _provider_client("httpx"),
    }
    if "transport_kind" in inspect.signature(ProviderClient.__init__).parameters:
        out["ProviderClient(aiohttp)"] = _provider_client("aiohttp")
    out["ProviderClient(httpx-aiohttp)"] = _provider_client("httpx-aiohttp")
    out["ProviderClient(native)"] = _provider_client("aiohttp-native")
    return out


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def measure(factory, url: str, c: int, seconds: float, warmup: float) -> tuple[float, float, int]:  # type: ignore[no-untyped-def]
    """(requests/s, client CPU ms per request, non-2xx answers) over the measured window."""
    done = 0
    bad = 0
    stop = False

    async def worker(send: Send) -> None:
        nonlocal done, bad
        while not stop:
            status = await send()
            done += 1
            if not 200 <= status < 300:
                bad += 1

    async with factory(url, c) as send:
        tasks = [asyncio.create_task(worker(send)) for _ in range(c)]
        await asyncio.sleep(warmup)
        n0, cpu0, t0 = done, _cpu(), time.perf_counter()
        await asyncio.sleep(seconds)
        n1, cpu1, t1 = done, _cpu(), time.perf_counter()
        stop = True
        await asyncio.gather(*tasks)
    n = n1 - n0
    return n / (t1 - t0), (cpu1 - cpu0) * 1000 / max(n, 1), bad


def _machine_busy() -> float:
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--concurrency", default="16,64,128,256")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--clients", default="", help="comma-separated subset of the client names")
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    available = clients()
    chosen = [c for c in args.clients.split(",") if c] or list(available)

    versions = ", ".join(
        f"{p} {_version(p)}" for p in ("httpx", "httpcore", "sniffio", "anyio", "aiohttp", "httpx-aiohttp")
    )
    print(f"{versions}; python {sys.version.split()[0]}; sandbox latency {args.latency_ms:g} ms")
    tmp = workdir("idv-http-")
    sandbox = Sandbox(args.latency_ms, tmp)
    sb = psutil.Process(sandbox.proc.pid)
    rows = []
    try:
        header = (
            f"{'client':<24} {'in-flight':>9} {'req/s':>8} {'bound':>7} {'client CPU ms/req':>17} "
            f"{'client CPU %':>12} {'sandbox CPU %':>13} {'errors':>6} {'load':>6}"
        )
        print(header)
        print("-" * len(header))
        for name in chosen:
            for c in levels:
                sandbox.reset()
                s0 = sb.cpu_times()
                m0 = _machine_busy()
                t0 = time.perf_counter()
                rate, cpu_ms, bad = asyncio.run(
                    measure(available[name], sandbox.url, c, args.seconds, args.warmup)
                )
                t1 = time.perf_counter()
                s1 = sb.cpu_times()
                m1 = _machine_busy()
                sandbox_pct = ((s1.user + s1.system) - (s0.user + s0.system)) / (t1 - t0) * 100
                # Everything but this process and the sandbox (over the whole run incl. warm-up).
                other = max(0.0, (m1 - m0) / (t1 - t0) - sandbox_pct / 100 - rate * cpu_ms / 1000)
                bound = c / (args.latency_ms / 1000.0)
                rows.append((name, c, rate, cpu_ms, bad))
                print(
                    f"{name:<24} {c:>9} {rate:>8,.0f} {bound:>7,.0f} {cpu_ms:>17.3f} "
                    f"{rate * cpu_ms / 10:>11.0f}% {sandbox_pct:>12.0f}% {bad:>6} {other:>6.1f}",
                    flush=True,
                )
    finally:
        sandbox.stop()


if __name__ == "__main__":
    main()
