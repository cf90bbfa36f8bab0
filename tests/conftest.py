"""Shared fixtures: the real local Kafka broker, topics, the sandbox provider, dedupe stores.

Integration tests use the real services. When ``CI`` is set a missing service fails the test; locally it
is skipped with the command that starts it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KAFKA_BOOTSTRAP = os.environ.get("IDV_TEST_KAFKA_BOOTSTRAP", "127.0.0.1:9092")


def reachable(hostport: str) -> bool:
    """Whether something accepts TCP connections at ``host:port``."""
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except OSError:
        return False


class FakeClock:
    """A clock a test moves by hand (``clock.now += 31``): what stores, leases and breakers read as time."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def free_port() -> int:
    """A loopback TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_missing(what: str, how: str) -> None:
    """Fail under CI (a missing service is a failure there), skip elsewhere."""
    message = f"{what} is not available; start it with: {how}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    if not reachable(KAFKA_BOOTSTRAP):
        if os.environ.get("IDV_TEST_START_KAFKA", "1") == "1":
            subprocess.run(["bash", str(ROOT / "scripts" / "kafka.sh"), "start"], check=False, timeout=300)
        if not reachable(KAFKA_BOOTSTRAP):
            service_missing("Kafka broker at " + KAFKA_BOOTSTRAP, "bash scripts/kafka.sh start")
    return KAFKA_BOOTSTRAP


def random_topic_name(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def create_topic(
    bootstrap: str,
    name: str,
    partitions: int = 8,
    *,
    with_sinks: bool = False,
    max_message_bytes: int | None = None,
) -> str:
    """Create ``name`` (and, with ``with_sinks``, its ``.dlq`` and ``.results`` topics)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    configs = {"max.message.bytes": str(max_message_bytes)} if max_message_bytes else {}
    names = [name, f"{name}.dlq", f"{name}.results"] if with_sinks else [name]
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(n, num_partitions=partitions, replication_factor=1, topic_configs=configs)
                for n in names
            ]
        )
    finally:
        await admin.close()
    return name


@pytest.fixture
async def topic(kafka_bootstrap: str) -> AsyncIterator[str]:
    """A fresh topic with 8 partitions (aiokafka's random_topic_name pattern), plus its .dlq and .results."""
    name = random_topic_name()
    await create_topic(kafka_bootstrap, name, 8, with_sinks=True)
    yield name
    await delete_topics(kafka_bootstrap, [name, f"{name}.dlq", f"{name}.results"])


async def delete_topics(bootstrap: str, names: list[str]) -> None:
    """Best effort: the suite creates thousands of partitions, and a broker keeps files open for each of
    them; past the fd limit (20,000 here) it dies with "Too many open files". A test's topics go with it."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    with contextlib.suppress(Exception):  # the broker may be down (a test stopped it): nothing to clean
        await admin.start()
        try:
            await admin.delete_topics(names)
        finally:
            await admin.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'dedupe.db'}"


@pytest.fixture
def sandbox() -> Iterator[object]:
    """The sandbox provider over real HTTP on loopback, in a background thread."""
    from sandbox import SandboxConfig, run_in_thread

    with run_in_thread(
        SandboxConfig(port=0, api_keys=("test-key",), out_of_credit_keys=("broke-key",))
    ) as handle:
        yield handle
