"""The benchmark's outside view of a variant's store (``bench/store_probe.py``), on a real SQLite file and
the shared PostgreSQL: what the daemon wrote through the store is what the probe counts, and a PostgreSQL
run's throw-away schema is gone afterwards."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.store_probe import probe_for, throwaway_schema
from consumer.store import Outcome, open_store
from tests.conftest import service_missing

pytestmark = pytest.mark.anyio


async def _write(url: str) -> None:
    store = open_store(url)
    async with store:
        for key in ("k-done", "k-open"):
            await store.claim(
                key=key,
                message_id=f"m-{key}",
                operation="aml_screening",
                fingerprint="fp",
                owner="probe-test",
                lease_s=30.0,
                retention_s=3600.0,
            )
        await store.complete("k-done", "probe-test", Outcome("approved", 200, "ref"))


async def _check(url: str) -> None:
    probe = probe_for(url)
    try:
        count, first, last = await probe.progress()
        assert count == 1  # only the completed record has an outcome
        assert first is not None and last is not None and last >= first
        assert await probe.recorded_keys() == {"k-done"}
        times = await probe.outcome_times(["m-k-done", "m-k-open"])
        assert set(times) == {"m-k-done"}
    finally:
        await probe.close()


async def test_sqlite_probe_counts_what_the_store_recorded(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'dedupe.db'}"
    probe = probe_for(url)
    assert await probe.progress() == (0, None, None)  # before the store exists
    await probe.close()
    await _write(url)
    await _check(url)


@pytest.mark.postgres
async def test_pg_probe_counts_what_the_store_recorded_and_the_schema_is_dropped() -> None:
    import asyncpg

    base = os.environ.get("IDV_TEST_POSTGRES_URL", "")
    if not base:
        service_missing("PostgreSQL (IDV_TEST_POSTGRES_URL is not set)", "bash scripts/postgres.sh start")
    async with throwaway_schema(base, "idv_probe_test_") as url:
        schema = url.rsplit("search_path=", 1)[1]
        probe = probe_for(url)
        assert await probe.progress() == (0, None, None)  # before the daemon migrated the schema
        await probe.close()
        await _write(url)
        await _check(url)
    conn = await asyncpg.connect(base)
    try:
        assert await conn.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", schema) == 0
    finally:
        await conn.close()
