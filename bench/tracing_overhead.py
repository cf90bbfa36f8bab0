"""What tracing costs on the hot path: ``Processor.handle`` per message with tracing off, on, and (run with
``PYTHONPATH`` at a checkout from before consumer/tracing.py existed) ``before``.

The provider is an ``httpx.MockTransport`` answering at once and the store SQLite on /dev/shm with
``synchronous=NORMAL``, so what is timed is the consumer's own CPU per message. With ``on`` the spans go
to the SDK's in-memory exporter through a SimpleSpanProcessor, with ``on-batch`` through a
BatchSpanProcessor (a background thread, as in the daemon); each message runs inside an ``idv.process``
span as in the daemon.

    python bench/tracing_overhead.py --mode off      # prints one JSON line: CPU µs per message
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
from aiokafka.structs import ConsumerRecord

from consumer.pipeline import Processor
from consumer.provider import ProviderClient, RetryPolicy
from consumer.store import open_store
from producer.envelope import Envelope, encode

SHM = "/dev/shm" if Path("/dev/shm").is_dir() else None


def _answer(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=orjson.dumps({"status": "approved", "id": "ref-1"}))


def _records(n: int) -> list[ConsumerRecord]:
    out = []
    for i in range(n):
        env = Envelope(
            message_id=f"m-{uuid.uuid4()}",
            operation="aml_screening",
            subject_id=f"s-{i % 50}",
            request={"full_name": f"Person {i}"},
        )
        headers = [
            *env.headers(),
            ("traceparent", f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01".encode()),
        ]
        out.append(
            ConsumerRecord(
                "t", i % 8, i, 0, 0, env.key, encode(env), None, len(encode(env)), 0, tuple(headers)
            )
        )
    return out


async def _run(mode: str, n: int, concurrency: int) -> float:
    message: Any = None
    if mode in ("on", "on-batch"):
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from consumer import tracing

        provider = TracerProvider()
        exporter = InMemorySpanExporter()
        # on-batch: as in the daemon, spans are handed to a background thread that exports them.
        processor_kind = BatchSpanProcessor if mode == "on-batch" else SimpleSpanProcessor
        provider.add_span_processor(processor_kind(exporter))
        tracing.install(tracing.Tracer(provider, group_id="bench"))
        message = tracing.message
    elif mode == "off":
        from consumer import tracing

        message = tracing.message
    directory = Path(tempfile.mkdtemp(dir=SHM))
    store = open_store(f"sqlite:///{directory / 'd.db'}?synchronous=NORMAL")
    await store.open()
    provider_client = ProviderClient(
        "http://provider", "k", retry=RetryPolicy(1, 0.01, 0.01), transport=httpx.MockTransport(_answer)
    )
    processor = Processor(
        store=store,
        provider=provider_client,
        owner="bench",
        namespace="idv",
        lease_s=60.0,
        retention_s=86400.0,
        max_message_bytes=1 << 20,
        fingerprint_key="bench-fingerprint-key-not-secret",
    )
    records = _records(n)
    limit = anyio.Semaphore(concurrency)

    async def one(rec: ConsumerRecord) -> None:
        async with limit:
            if message is None:
                await processor.handle(rec)
            else:
                with message(rec):
                    await processor.handle(rec)

    # CPU time of the process (event loop and SQLite writer thread): less disturbed by other load on a
    # shared machine than wall time.
    started = time.process_time()
    async with anyio.create_task_group() as tg:
        for rec in records:
            tg.start_soon(one, rec)
    elapsed = time.process_time() - started
    await store.close()
    if mode == "on":
        assert len(exporter.get_finished_spans()) >= 4 * n
    if mode == "on-batch":
        provider.shutdown()
    return elapsed / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("before", "off", "on", "on-batch"), required=True)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    runs = [anyio.run(_run, args.mode, args.messages, args.concurrency) for _ in range(args.repeat)]
    print(
        json.dumps({"mode": args.mode, "cpu_us_per_message": round(statistics.median(runs), 1), "runs": runs})
    )


if __name__ == "__main__":
    main()
