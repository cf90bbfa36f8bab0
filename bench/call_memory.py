"""Memory per provider call in flight, by layer: ``python bench/call_memory.py`` prints a table.

#14's RSS target is set at 4,096 calls in flight. This measures what one call in flight costs in one
process, layer by layer, against a real sandbox process whose every answer takes ``--latency-ms``:

* ``project``: the provider client's exchange (``consumer.exchange.ProviderExchange._send``: the
  ``httpx.Request`` it builds, on ``consumer.http.AiohttpTransport``), without retries, gate or breaker;
* ``aiohttp``: one ``aiohttp.ClientSession.post`` per call (no httpx objects);
* ``streams``: ``asyncio.open_connection`` and a hand-written request (one socket and two stream objects);
* ``task``: a task that only sleeps (the floor: a task and its coroutine).

Each row starts the calls, waits until they are all in flight (``--settle-s``, well under the latency),
and reads the process's RSS; the figure is (RSS then − RSS before) ÷ calls. Each row runs in a fresh
process (``--row``), so one row's freed-but-kept memory does not count for the next.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODES = ("project", "aiohttp", "streams", "task")


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def _row(mode: str, calls: int, latency_ms: float, settle_s: float, workdir: Path) -> str:
    import aiohttp

    from bench.common import API_KEY, Sandbox
    from consumer.exchange import ProviderExchange

    sandbox = Sandbox(latency_ms, workdir)
    url = sandbox.url
    host, port = url.removeprefix("http://").rsplit(":", 1)
    body = b'{"subject":{"document_id":"d"}}'
    exchange = ProviderExchange(
        url, API_KEY, timeout_s=30.0, max_connections=calls, transport=None, transport_kind="aiohttp"
    )
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=calls))
    stamp = f"{time.time_ns()}"

    async def one(i: int) -> int:
        key = f"idv_mem_{stamp}_{i}".encode()
        if mode == "project":
            headers = [*exchange._base_headers, (b"idempotency-key", key)]
            response = await exchange._send("POST", "/v3/aml/", headers, body)
            return response.status_code
        if mode == "aiohttp":
            headers = {"x-api-key": API_KEY, "idempotency-key": key.decode()}
            async with session.post(url + "/v3/aml/", data=body, headers=headers) as answer:
                await answer.read()
                return answer.status
        if mode == "streams":
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                b"POST /v3/aml/ HTTP/1.1\r\nHost: " + host.encode() + b"\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\nx-api-key: " + API_KEY.encode()
                + b"\r\nidempotency-key: " + key + b"\r\n\r\n" + body
            )
            status = int((await reader.readline()).split()[1])
            writer.close()
            return status
        await asyncio.sleep(latency_ms / 1000)
        return 0

    try:
        before = _rss_mib()
        tasks = [asyncio.create_task(one(i)) for i in range(calls)]
        await asyncio.sleep(settle_s)
        during = _rss_mib()
        statuses = sorted(set(await asyncio.gather(*tasks)))
    finally:
        await exchange.aclose()
        await session.close()
        sandbox.stop()
    per_call = (during - before) * 1024 / calls
    return f"{mode:<8} {calls:>6,} {before:>9.0f} {during:>9.0f} {per_call:>13.1f}  {statuses}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", default="512,2048,4096", help="calls in flight per row")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--latency-ms", type=float, default=3000.0)
    parser.add_argument("--settle-s", type=float, default=2.0)
    parser.add_argument("--row", nargs=2, metavar=("MODE", "CALLS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        with tempfile.TemporaryDirectory(prefix="idv-callmem-") as tmp:
            print(asyncio.run(_row(args.row[0], int(args.row[1]), args.latency_ms, args.settle_s, Path(tmp))))
        return 0
    print(
        f"memory per provider call in flight (sandbox latency {args.latency_ms:g} ms, "
        f"RSS after {args.settle_s:g} s)"
    )
    print(f"{'layer':<8} {'calls':>6} {'RSS0 MiB':>9} {'RSS MiB':>9} {'KiB per call':>13}  statuses")
    for mode in args.modes.split(","):
        for calls in (int(c) for c in args.calls.split(",")):
            cmd = [sys.executable, __file__, "--row", mode, str(calls), "--latency-ms", str(args.latency_ms)]
            cmd += ["--settle-s", str(args.settle_s)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            failed = f"{mode:<8} {calls:>6,} failed: {out.stderr.strip()[-300:]}"
            print(out.stdout.strip() or failed, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
