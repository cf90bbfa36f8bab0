"""Dedupe-store micro-benchmark: claim + complete throughput per backend and concurrency.

Each worker takes the next new key, claims it and records an outcome: the two store transitions every
first-time message costs. Workers pull from one shared counter (a fixed set of workers, not a task per
record). Prints a plain-text table; it asserts nothing about speed.

    python bench/store_bench.py                       # SQLite FULL/NORMAL, PostgreSQL if reachable
    python bench/store_bench.py --records 5000 --concurrency 1,16,64,256
    python bench/store_bench.py --postgres-url postgresql://idv:idv@127.0.0.1:5432/idv --pg-pools 10,64

SQLite files go under ``--dir`` (default ``.run/bench``, the filesystem the daemon's default store uses;
``/tmp`` may be a RAM disk, which would hide the fsync cost). PostgreSQL runs in a throw-away schema of the
given database, dropped afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from consumer.cli import event_loop_options  # noqa: E402 - after the path set-up
from consumer.store import DedupeStore, Outcome, open_store  # noqa: E402

Factory = Callable[[], Awaitable[tuple[DedupeStore, Callable[[], Awaitable[None]]]]]
DEFAULT_PG_URL = "postgresql://idv:idv@127.0.0.1:5432/idv"
OUTCOME = Outcome("approved", 200, "ref-bench")


@dataclass
class Result:
    backend: str
    concurrency: int
    records: int
    seconds: float
    latencies: list[float]
    cpu_s: float = float("nan")  # this process's CPU (event loop, driver, writer thread) over the run

    @property
    def rate(self) -> float:
        return self.records / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def run_load(
    store: DedupeStore, records: int, concurrency: int, prefix: str
) -> tuple[float, list[float]]:
    next_index = 0
    latencies: list[float] = []

    async def worker() -> None:
        nonlocal next_index
        while next_index < records:
            i = next_index
            next_index += 1
            key = f"{prefix}-{i}"
            started = time.perf_counter()
            await store.claim(
                key=key,
                message_id=key,
                operation="aml_screening",
                fingerprint="fp",
                owner="bench",
                lease_s=30.0,
                retention_s=3600.0,
            )
            await store.complete(key, "bench", OUTCOME)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    return time.perf_counter() - started, latencies


async def measure(
    name: str,
    make: Factory,
    records: int,
    concurrency: int,
    warmup: int,
) -> Result:
    store, cleanup = await make()
    try:
        async with store:
            await run_load(store, warmup, min(concurrency, warmup), "warm-" + uuid.uuid4().hex[:8])
            cpu0 = time.process_time()
            seconds, latencies = await run_load(store, records, concurrency, "run-" + uuid.uuid4().hex[:8])
            cpu = time.process_time() - cpu0
    finally:
        await cleanup()
    return Result(name, concurrency, records, seconds, latencies, cpu)


def sqlite_factory(directory: Path, synchronous: str) -> Factory:
    async def make() -> tuple[DedupeStore, Callable[[], Awaitable[None]]]:
        run_dir = Path(tempfile.mkdtemp(prefix="store-", dir=directory))

        async def cleanup() -> None:
            shutil.rmtree(run_dir, ignore_errors=True)

        return open_store(f"sqlite:///{run_dir / 'bench.db'}?synchronous={synchronous}"), cleanup

    return make


def postgres_factory(url: str, pool: int, inflight: int | None = None, batch: int = 256) -> Factory:
    from bench.store_probe import throwaway_schema
    from consumer.store.postgres import PostgresStore

    async def make() -> tuple[DedupeStore, Callable[[], Awaitable[None]]]:
        stack = contextlib.AsyncExitStack()
        store_url = await stack.enter_async_context(throwaway_schema(url))

        async def cleanup() -> None:
            await stack.aclose()

        return PostgresStore(store_url, max_size=pool, max_inflight=inflight, max_batch=batch), cleanup

    return make


async def postgres_info(url: str) -> str | None:
    try:
        import asyncpg

        conn = await asyncpg.connect(url, timeout=3)
    except Exception as exc:  # noqa: BLE001 - any failure means "skip PostgreSQL", reported in the header
        print(f"# PostgreSQL skipped: {type(exc).__name__}: {exc}")
        return None
    try:
        version = await conn.fetchval("SHOW server_version")
        fsync = await conn.fetchval("SHOW fsync")
        sync_commit = await conn.fetchval("SHOW synchronous_commit")
        return f"PostgreSQL {version} (fsync={fsync}, synchronous_commit={sync_commit})"
    finally:
        await conn.close()


def print_table(results: list[Result]) -> None:
    header = ("backend", "conc", "records", "seconds", "records/s", "p50 ms", "p99 ms", "CPU µs/rec")
    rows = [
        (
            r.backend,
            str(r.concurrency),
            str(r.records),
            f"{r.seconds:.2f}",
            f"{r.rate:,.0f}",
            f"{r.percentile(0.50):.2f}",
            f"{r.percentile(0.99):.2f}",
            f"{r.cpu_s * 1e6 / r.records:.0f}",
        )
        for r in results
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]

    def line(cells: tuple[str, ...]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))])

    print(line(header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


async def main(args: argparse.Namespace) -> None:
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    directory: Path = args.dir

    backends: list[tuple[str, Factory]] = []
    if not args.postgres_only:
        backends += [
            ("sqlite FULL", sqlite_factory(directory, "FULL")),
            ("sqlite NORMAL", sqlite_factory(directory, "NORMAL")),
        ]
    loop = "uvloop" if event_loop_options(args.event_loop) else "asyncio"
    print(
        f"# Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs, "
        f"{loop} event loop"
    )
    print(f"# SQLite files under {directory}")
    pg_url = args.postgres_url
    if pg_url and (info := await postgres_info(pg_url)):
        print(f"# {info}")
        pools = [int(p) for p in args.pg_pools.split(",")]
        inflights = [int(n) if n != "default" else None for n in args.pg_inflight.split(",")]
        for pool in pools:
            for n in inflights:
                name = f"postgresql pool={pool}" + (f" inflight={n}" if len(inflights) > 1 else "")
                backends.append((name, postgres_factory(pg_url, pool, n, args.pg_batch)))
    print(
        f"# each record: claim (new key) + complete; {args.records} records per run, "
        f"after {args.warmup} untimed"
    )
    print()

    # --rounds N: the backends interleaved (A B A B …) at each concurrency, so runs taken back to back on
    # a shared machine compare; the table is sorted by backend afterwards.
    results = [
        await measure(name, make, args.records, concurrency, args.warmup)
        for concurrency in concurrencies
        for _ in range(args.rounds)
        for name, make in backends
    ]
    order = {name: i for i, (name, _) in enumerate(backends)}
    results.sort(key=lambda r: (order[r.backend], r.concurrency))
    print_table(results)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=20000, help="records per run (default 20000)")
    parser.add_argument(
        "--warmup", type=int, default=100, help="untimed records before each run (default 100)"
    )
    parser.add_argument(
        "--concurrency", default="1,16,64,256", help="comma-separated worker counts (default 1,16,64,256)"
    )
    parser.add_argument(
        "--event-loop",
        default="auto",
        choices=["auto", "uvloop", "asyncio"],
        help="as the daemon's IDV_EVENT_LOOP (default auto: uvloop when installed)",
    )
    parser.add_argument("--dir", default=str(ROOT / ".run" / "bench"), help="where SQLite files are created")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("IDV_BENCH_POSTGRES_URL")
        or os.environ.get("IDV_TEST_POSTGRES_URL")
        or DEFAULT_PG_URL,
        help="PostgreSQL to measure ('' to skip); default $IDV_BENCH_POSTGRES_URL, $IDV_TEST_POSTGRES_URL or "
        + DEFAULT_PG_URL,
    )
    parser.add_argument("--pg-pools", default="10,64", help="PostgreSQL pool sizes to try (default 10,64)")
    parser.add_argument(
        "--pg-inflight",
        default="default",
        help="PostgreSQL batches in flight to compare, e.g. 4,8 (default: the store's default)",
    )
    parser.add_argument("--pg-batch", type=int, default=256, help="PostgreSQL max operations per batch")
    parser.add_argument("--postgres-only", action="store_true", help="skip the SQLite rows")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved repeats of every backend")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    arguments.dir = Path(arguments.dir).resolve()
    arguments.dir.mkdir(parents=True, exist_ok=True)
    anyio.run(main, arguments, backend_options=event_loop_options(arguments.event_loop))
