"""Record-level fuzzing through the real daemon process: random keys, values and headers, mutated valid
envelopes, and records aiokafka cannot read (non-UTF-8 header keys, written with kcat).

Invariants: the daemon never crashes (alive throughout, clean exit, no traceback); every record that is
not a valid request is dead-lettered with the reason ``decode`` gives it (``undecodable_record`` for those
the client cannot read); every valid request ends recorded; nothing is dead-lettered twice or as
``internal_error``; the group commits to the end of the topic.

CI runs ``IDV_FUZZ_RECORDS`` records (default 300; ``IDV_FUZZ_SEED``, ``IDV_FUZZ_TRANSACTIONAL=1`` for
transactional results). The big run::

    make fuzz                                    # 10,000 records
    python -m tests.consumer.test_record_fuzz 20000 --seed 7 [--transactional]
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from consumer.keys import idempotency_key
from consumer.store import State, open_store
from producer.envelope import Envelope, decode, encode
from producer.errors import EnvelopeError
from tests.conftest import service_missing
from tests.consumer.conftest import (
    Sandbox,
    daemon_env,
    read_all,
    start_daemon,
)
from tests.consumer.test_exactly_once import make_envelopes
from tests.consumer.test_hostile_records import wait_alive_and_committed

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]

RECORDS = int(os.environ.get("IDV_FUZZ_RECORDS", "300"))
SEED = int(os.environ.get("IDV_FUZZ_SEED", "20261201"))
TRANSACTIONAL = os.environ.get("IDV_FUZZ_TRANSACTIONAL", "") not in ("", "0", "false")
PARTITIONS = 8


@dataclass
class Sent:
    kind: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    expect: str  # "valid" (must complete), "maybe" (decodes; must end recorded) or a dead-letter reason
    envelope: Envelope | None = None
    partition: int = 0
    offset: int = -1


def _rand_bytes(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


def _rand_headers(rng: random.Random) -> list[tuple[str, bytes]]:
    out = []
    for _ in range(rng.choice((0, 0, 1, 2, 5, 30))):
        name = rng.choice(
            ("x-trace", "idv-message-id", "idv-operation", "", "ä-ü", "x-" + str(rng.randrange(1000)), "😀")
        )
        out.append((name, _rand_bytes(rng, rng.randrange(0, 40))))
    return out


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(5)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:  # flip a byte
            b[min(pos, len(b) - 1)] = rng.randrange(256)
        elif op == 1:  # truncate
            del b[pos:]
        elif op == 2:  # insert junk
            b[pos:pos] = _rand_bytes(rng, rng.randrange(1, 8))
        elif op == 3 and b:  # a structural character somewhere
            b[min(pos, len(b) - 1)] = ord(rng.choice('{}[]":,\\0e-'))
        else:  # drop a slice
            del b[pos : pos + rng.randrange(1, 20)]
    return bytes(b)


def _expect(value: bytes | None, headers: list[tuple[str, bytes]]) -> str:
    try:
        decode(value, headers)
    except EnvelopeError as exc:
        return exc.reason
    return "maybe"


def generate(n: int, seed: int) -> list[Sent]:
    rng = random.Random(seed)
    envs = iter(make_envelopes(n, seed=seed))
    out: list[Sent] = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.35:  # a valid request, unchanged
            env = next(envs)
            out.append(Sent("valid", env.key, encode(env), env.headers(), "valid", env))
        elif roll < 0.65:  # a mutated valid envelope (its own ID: no other record shares it)
            env = next(envs)
            value = _mutate(rng, encode(env))
            headers = env.headers() if rng.random() < 0.8 else _rand_headers(rng)
            out.append(Sent("mutated", env.key, value, headers, _expect(value, headers)))
        elif roll < 0.95:  # random bytes, random headers, sometimes no key or no value
            key = None if rng.random() < 0.3 else _rand_bytes(rng, rng.randrange(0, 64))
            value = None if rng.random() < 0.1 else _rand_bytes(rng, rng.choice((0, 1, 10, 200, 5000)))
            if key is None and value is None:
                value = b""  # aiokafka cannot write neither (kcat can: test_hostile_records)
            headers = _rand_headers(rng)
            out.append(Sent("random", key, value, headers, _expect(value, headers)))
        else:  # a header key that is not UTF-8: aiokafka cannot read the record at all
            value = _rand_bytes(rng, rng.randrange(1, 100)).replace(b"\n", b" ")
            out.append(Sent("unreadable", b"k", value, [], "undecodable_record"))
    return out


async def publish(bootstrap: str, topic: str, records: list[Sent], seed: int) -> None:
    rng = random.Random(seed + 1)
    exe = shutil.which("kcat")
    if exe is None:
        service_missing("kcat", "apt-get install kcat")
    assert exe is not None
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        futures = []
        for r in records:
            if r.kind == "unreadable":
                continue
            r.partition = rng.randrange(PARTITIONS)
            fut = await producer.send(topic, r.value, key=r.key, headers=r.headers, partition=r.partition)
            futures.append((r, fut))
        for r, fut in futures:
            r.offset = (await fut).offset
    finally:
        await producer.stop()
    for r in records:
        if r.kind == "unreadable":
            r.partition = rng.randrange(PARTITIONS)
            kcat_unreadable(exe, bootstrap, topic, r, rng)


def kcat_unreadable(exe: str, bootstrap: str, topic: str, r: Sent, rng: random.Random) -> None:
    """One record with a header key that is not UTF-8 (aiokafka's producer only takes str keys)."""
    args: list[str | bytes] = [exe, "-b", bootstrap, "-P", "-t", topic, "-p", str(r.partition), "-k", "k"]
    args += ["-H", b"\xc3\x28bad=" + str(rng.randrange(10)).encode()]
    subprocess.run(args, input=(r.value or b"") + b"\n", check=True, timeout=30, capture_output=True)


async def run_fuzz(
    bootstrap: str, topic: str, sandbox_url: str, store_url: str, tmp: Path, n: int, seed: int
) -> dict[str, object]:
    records = generate(n, seed)
    await publish(bootstrap, topic, records, seed)
    group = "g-" + uuid.uuid4().hex[:8]
    extra = {}
    if TRANSACTIONAL:
        extra = {"results_transactional": "true", "instance_id": "fuzz-" + uuid.uuid4().hex[:8]}
    env = daemon_env(
        bootstrap=bootstrap, topic=topic, group=group, store_url=store_url, provider_url=sandbox_url, **extra
    )
    started = time.monotonic()
    proc = start_daemon(env, tmp / "daemon.log")
    try:
        # 60 s + n/20 (under pytest's 120 s at CI's 300 records): a stall fails with its own message.
        await wait_alive_and_committed(proc, bootstrap, group, topic, 60 + n / 20)
        elapsed = time.monotonic() - started
        proc.terminate()
        assert proc.wait(60) == 0, proc.log()[-3000:]
    finally:
        proc.kill()
    log = proc.log()
    assert "Traceback" not in log, log[-3000:]

    letters = await read_all(bootstrap, f"{topic}.dlq")
    by_pos: dict[tuple[int, int], str] = {}
    for m in letters:
        h = dict(m.headers)
        pos = (int(h["idv-dlq-original-partition"]), int(h["idv-dlq-original-offset"]))
        assert pos not in by_pos, f"dead-lettered twice: {pos}"
        by_pos[pos] = h["idv-dlq-reason"].decode()
    assert "internal_error" not in by_pos.values(), "a record met a bug in the consumer"

    readable = [r for r in records if r.kind != "unreadable"]
    async with open_store(store_url) as store:
        for r in readable:
            got = by_pos.get((r.partition, r.offset))
            if r.expect in ("valid", "maybe"):
                assert got is None, (r.kind, got)
                env = r.envelope or decode(r.value, r.headers)
                rec = await store.get(idempotency_key("idv", env.operation, env.message_id))
                assert rec is not None and rec.state in (State.COMPLETED, State.FAILED), (r.kind, rec)
                if r.expect == "valid":
                    assert rec.state is State.COMPLETED
            else:
                assert got == r.expect, (r.kind, r.expect, got)
    known = {(r.partition, r.offset) for r in readable}
    unreadable = [pos for pos, reason in by_pos.items() if pos not in known]
    assert sorted(by_pos[p] for p in unreadable) == ["undecodable_record"] * sum(
        r.kind == "unreadable" for r in records
    )
    effects = Sandbox(sandbox_url).side_effects()
    for r in records:
        if r.envelope is not None:
            assert effects[idempotency_key("idv", r.envelope.operation, r.envelope.message_id)] == 1
    return {
        "records": n,
        "seed": seed,
        "transactional": TRANSACTIONAL,
        "kinds": dict(Counter(r.kind for r in records)),
        "dead_letters": dict(Counter(by_pos.values())),
        "processed": sum(r.expect in ("valid", "maybe") for r in records),
        "crashes": 0,
        "seconds": round(elapsed, 1),
    }


async def test_record_fuzz_through_the_daemon(
    kafka_bootstrap: str, topic: str, sandbox: object, sqlite_url: str, tmp_path: Path
) -> None:
    url: str = sandbox.url  # type: ignore[attr-defined]
    summary = await run_fuzz(kafka_bootstrap, topic, url, sqlite_url, tmp_path, RECORDS, SEED)
    print(summary)  # the figures of the run (pytest -s)


if __name__ == "__main__":
    # python -m tests.consumer.test_record_fuzz [records] [--seed N]: the big run, through pytest.
    argv = sys.argv[1:]
    env = dict(os.environ)
    if argv and argv[0].isdigit():
        env["IDV_FUZZ_RECORDS"] = argv.pop(0)
    while argv:
        flag = argv.pop(0)
        if flag == "--seed" and argv:
            env["IDV_FUZZ_SEED"] = argv.pop(0)
        elif flag == "--transactional":
            env["IDV_FUZZ_TRANSACTIONAL"] = "1"
    test = f"{__file__}::test_record_fuzz_through_the_daemon"
    cmd = [sys.executable, "-m", "pytest", test, "-q", "-s", "-p", "no:cacheprovider", "--timeout", "3600"]
    sys.exit(subprocess.call(cmd, env=env))
