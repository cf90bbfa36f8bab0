"""The consumers the daemon is compared with, each run as its own process by ``bench/throughput.py``.

All of them do the same work per message as the daemon: :class:`consumer.pipeline.Processor` (decode →
key → fingerprint → claim in the SQLite dedupe store → :class:`consumer.provider.ProviderClient` call →
complete), so the comparison isolates how messages are scheduled and offsets committed.

* ``naive``: a plain aiokafka loop. One task per partition handles that partition's messages one at a
  time (partitions run concurrently) and commits after every message.
* ``naive-pp``: the same loop with **one AIOKafkaConsumer per partition** (manual assignment, commits
  to the same group): aiokafka serialises the commits of one consumer behind a lock, so ``naive``'s
  eight partitions wait for each other's commits; this variant shows how much of "N× naive" that was.
* ``faststream``: a FastStream Kafka subscriber with ``AckPolicy.MANUAL``; the handler calls
  ``msg.ack()`` (a commit) after the outcome is recorded. ``max_workers`` = partitions, which FastStream
  turns into one consumer per worker in the same group (its concurrent mode for manual commits:
  concurrent between partitions, sequential within one).
* ``raw``: aiokafka ``getmany`` with no work at all, the consumption ceiling; prints one JSON line.

SIGTERM stops ``naive`` and ``faststream`` after the message in hand; every finished message is already
committed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from consumer.cli import event_loop_options
from consumer.gcpolicy import tune_gc
from consumer.pipeline import Processor
from consumer.provider import ProviderClient
from consumer.store import open_store

API_KEY = os.environ.get("BENCH_API_KEY", "bench-key")


def _processor(args: argparse.Namespace, store: object, provider: ProviderClient) -> Processor:
    return Processor(
        store=store,  # type: ignore[arg-type]
        provider=provider,
        owner=f"bench-{args.kind}:{os.getpid()}:{uuid.uuid4().hex[:6]}",
        namespace="idv",
        lease_s=60.0,
        retention_s=30 * 86400.0,
        max_message_bytes=1024 * 1024,
        fingerprint_key="bench-fingerprint-key-not-secret",  # keyed like the daemon's
    )


def _provider(args: argparse.Namespace) -> ProviderClient:
    # The same client, and the same transport, as the daemon under comparison.
    kind = args.provider_transport
    if kind == "aiohttp-native":
        from bench import native_aiohttp

        client = ProviderClient(args.provider_url, API_KEY, max_connections=args.partitions)
        native_aiohttp.install(client, timeout_s=10.0, max_connections=args.partitions)
        return client
    kwargs = {} if kind == "httpx" else {"transport_kind": kind}
    return ProviderClient(args.provider_url, API_KEY, max_connections=args.partitions, **kwargs)


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


@contextlib.asynccontextmanager
async def _processing(args: argparse.Namespace) -> AsyncIterator[tuple[asyncio.Event, Processor]]:
    """The stop event (SIGTERM/SIGINT) and a processor over an open store and provider client."""
    stop = _stop_event()
    store = open_store(args.store_url or f"sqlite:///{args.store}")
    provider = _provider(args)
    async with store, provider:
        yield stop, _processor(args, store, provider)


# -- naive ---------------------------------------------------------------------------------------------


async def naive(args: argparse.Namespace) -> None:
    async with _processing(args) as (stop, processor):
        consumer = AIOKafkaConsumer(
            args.topic,
            bootstrap_servers=args.bootstrap,
            group_id=args.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
        )
        await consumer.start()
        queues: dict[TopicPartition, asyncio.Queue[ConsumerRecord]] = {}
        workers: list[asyncio.Task[None]] = []

        timing = {"handle": 0.0, "commit": 0.0, "n": 0}
        in_hand: set[asyncio.Task[None]] = set()

        async def work(tp: TopicPartition, queue: asyncio.Queue[ConsumerRecord]) -> None:
            me = asyncio.current_task()
            assert me is not None
            while not stop.is_set():
                msg = await queue.get()
                in_hand.add(me)
                t0 = time.perf_counter()
                await processor.handle(msg)
                t1 = time.perf_counter()
                # Commit after every message: exactly the pattern PITFALLS warns about.
                await consumer.commit({tp: msg.offset + 1})
                in_hand.discard(me)
                timing["handle"] += t1 - t0
                timing["commit"] += time.perf_counter() - t1
                timing["n"] += 1

        async def fetch() -> None:
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=200, max_records=500)
                for tp, msgs in batch.items():
                    queue = queues.get(tp)
                    if queue is None:
                        queue = queues[tp] = asyncio.Queue(maxsize=1000)
                        workers.append(asyncio.create_task(work(tp, queue)))
                    for msg in msgs:
                        await queue.put(msg)

        fetcher = asyncio.create_task(fetch())
        await stop.wait()
        fetcher.cancel()
        # Idle workers stop now; busy ones finish the message in hand (its commit included) and return.
        for task in workers:
            if task not in in_hand:
                task.cancel()
        busy = [t for t in workers if t in in_hand]
        if busy:
            await asyncio.wait(busy, timeout=10)
        for task in [fetcher, *workers]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await consumer.stop()
        if timing["n"]:
            n = timing["n"]
            # Where a sequential message's time goes (printed to the log).
            per_msg = {"handle_ms": timing["handle"] * 1000 / n, "commit_ms": timing["commit"] * 1000 / n}
            print(json.dumps({"messages": n, **per_msg}), file=sys.stderr)


async def naive_per_partition(args: argparse.Namespace) -> None:
    """``naive`` with one consumer (and so one commit lock) per partition, assigned by hand."""
    async with _processing(args) as (stop, processor):
        consumers = [
            AIOKafkaConsumer(
                bootstrap_servers=args.bootstrap,
                group_id=args.group,  # commits only: manual assignment joins no group
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                isolation_level="read_committed",
            )
            for _ in range(args.partitions)
        ]

        async def lane(consumer: AIOKafkaConsumer, tp: TopicPartition) -> None:
            await consumer.start()
            consumer.assign([tp])
            try:
                while not stop.is_set():
                    batch = await consumer.getmany(tp, timeout_ms=200, max_records=50)
                    for msg in batch.get(tp, []):
                        if stop.is_set():  # what was fetched and not handled stays uncommitted
                            break
                        await processor.handle(msg)
                        await consumer.commit({tp: msg.offset + 1})
            finally:
                await consumer.stop()

        lanes = [asyncio.create_task(lane(c, TopicPartition(args.topic, p))) for p, c in enumerate(consumers)]
        await stop.wait()
        # Each lane finishes the message in hand (its commit included), then stops its consumer.
        _, pending = await asyncio.wait(lanes, timeout=15)
        for task in pending:
            task.cancel()
        for task in lanes:
            with contextlib.suppress(asyncio.CancelledError):
                await task


# -- FastStream ----------------------------------------------------------------------------------------


async def faststream(args: argparse.Namespace) -> None:
    from faststream import AckPolicy
    from faststream.kafka import KafkaBroker
    from faststream.kafka.annotations import KafkaMessage

    async with _processing(args) as (stop, processor):
        # logger=None: no per-message "Received"/"Processed" lines, like the daemon at IDV_LOG_LEVEL=WARNING.
        import logging

        debug = os.environ.get("FS_DEBUG") == "1"
        if debug:
            logging.basicConfig(level=logging.INFO)
        broker = KafkaBroker(args.bootstrap, **({} if debug else {"logger": None}))

        async def keep_bytes(msg: Any) -> bytes:
            # The Processor decodes the record itself; FastStream's JSON decoding would be wasted work.
            return msg.body  # type: ignore[no-any-return]

        @broker.subscriber(
            args.topic,
            decoder=keep_bytes,
            group_id=args.group,
            ack_policy=AckPolicy.MANUAL,
            max_workers=args.partitions,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
        )
        async def handle(body: bytes, msg: KafkaMessage) -> None:
            await processor.handle(msg.raw_message)  # type: ignore[arg-type]
            await msg.ack()

        await broker.start()
        await stop.wait()
        await broker.stop()


# -- raw consumption ceiling ---------------------------------------------------------------------------


async def raw(args: argparse.Namespace) -> None:
    consumer = AIOKafkaConsumer(
        args.topic,
        bootstrap_servers=args.bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    await consumer.start()
    count = first_n = 0
    first = last = 0.0
    deadline = time.monotonic() + args.timeout
    try:
        while count < args.expect and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200, max_records=500)
            n = sum(len(m) for m in batch.values())
            if n:
                now = time.monotonic()
                if not count:
                    first, first_n = now, n
                last = now
                count += n
    finally:
        await consumer.stop()
    # The first batch is the start mark, so it is not counted in the rate.
    print(json.dumps({"count": count, "first_batch": first_n, "seconds": last - first}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["naive", "naive-pp", "faststream", "raw"])
    parser.add_argument("--topic", required=True)
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--group", default="bench")
    parser.add_argument("--store", default="", help="SQLite file (or --store-url)")
    parser.add_argument("--store-url", default="", help="any dedupe store URL (sqlite:///…, postgresql://…)")
    parser.add_argument("--provider-url", default="")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument(
        "--provider-transport",
        default="httpx",
        choices=["httpx", "aiohttp", "httpx-aiohttp", "aiohttp-native"],
    )
    parser.add_argument("--event-loop", default="auto", choices=["auto", "uvloop", "asyncio"])
    parser.add_argument("--expect", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    fn = {"naive": naive, "naive-pp": naive_per_partition, "faststream": faststream, "raw": raw}[args.kind]
    # The same event loop and GC settings as the daemon, so the comparison is about scheduling only.
    tune_gc()
    anyio.run(fn, args, backend_options=event_loop_options(args.event_loop))


if __name__ == "__main__":
    main()
