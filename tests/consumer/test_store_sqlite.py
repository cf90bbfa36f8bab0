"""SQLite-only behaviour of the group-commit writer (the shared rules are in test_store_contract.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio
import pytest

from consumer.errors import LeaseLost, StoreError
from consumer.store import ClaimStatus, Outcome
from consumer.store.sqlite import SqliteStore

pytestmark = pytest.mark.anyio


async def test_an_operation_failing_half_way_is_rolled_back_alone(tmp_path: Path) -> None:
    """Operations in one batch share a transaction without savepoints; one that raises after writing
    makes the writer re-run the batch with one savepoint each, so only its own write is undone."""
    store = SqliteStore(tmp_path / "s.db")
    await store.open()
    try:

        def half_way(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO schema_version (version) VALUES (99)")
            raise RuntimeError("bug after a write")

        results: dict[str, object] = {}

        async def claim(key: str) -> None:
            results[key] = await store.claim(
                key=key, message_id=key, operation="aml_screening", fingerprint="fp", owner="o",
                lease_s=30, retention_s=3600,
            )  # fmt: skip

        async def bad() -> None:
            with pytest.raises(RuntimeError, match="bug after a write"):
                await store._submit(half_way)

        async def lost() -> None:
            with pytest.raises(LeaseLost):
                await store.complete("never-claimed", "o", Outcome("approved", 200, None))

        async with anyio.create_task_group() as tg:  # queued together: very likely one batch
            tg.start_soon(claim, "k1")
            tg.start_soon(bad)
            tg.start_soon(lost)
            tg.start_soon(claim, "k2")
        assert {getattr(r, "status", None) for r in results.values()} == {ClaimStatus.ACQUIRED}
        assert (await store.get("k1")) is not None and (await store.get("k2")) is not None

        def versions(conn: sqlite3.Connection) -> list[int]:
            return [row[0] for row in conn.execute("SELECT version FROM schema_version")]

        assert 99 not in await store._submit(versions)
    finally:
        await store.close()


async def test_a_closed_store_refuses_operations(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    await store.open()
    await store.close()
    with pytest.raises(StoreError, match="not open"):
        await store.get("k")


async def test_a_cancelled_caller_leaves_only_after_its_transition_is_durable(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    await store.open()
    try:
        with anyio.CancelScope() as scope:
            scope.cancel()  # already cancelled when the claim is queued
            await store.claim(
                key="k", message_id="k", operation="aml_screening", fingerprint="fp", owner="o",
                lease_s=30, retention_s=3600,
            )  # fmt: skip
        # The caller saw the cancellation, but only after its claim was committed: another connection,
        # reading the file right away (not through the store's queue), already sees it.
        assert scope.cancelled_caught
        with sqlite3.connect(tmp_path / "s.db") as other:
            row = other.execute("SELECT owner FROM idempotency_records WHERE key = 'k'").fetchone()
        assert row == ("o",)
    finally:
        await store.close()


@pytest.mark.timeout(15)  # the bug this pins is a hang inside a shielded wait, which fail_after cannot end
async def test_a_caller_cancelled_while_its_batch_commits_does_not_hang(tmp_path: Path) -> None:
    """The cancellation is delivered in the same loop iteration as the writer's wake-up, just before it:
    the wake-up then finds the caller's future already cancelled. The caller must still leave once the
    transition is durable, not wait for a second wake-up that never comes."""
    import asyncio

    store = SqliteStore(tmp_path / "s.db")
    await store.open()
    scope = anyio.CancelScope()
    loop = asyncio.get_running_loop()
    run_batch = store._run_batch

    def run_batch_then_cancel(ops: list[object]) -> None:
        run_batch(ops)  # type: ignore[arg-type]
        loop.call_soon_threadsafe(scope.cancel)  # queued before the writer queues its wake-up

    store._run_batch = run_batch_then_cancel  # type: ignore[method-assign]
    try:
        with anyio.fail_after(5):
            with scope:
                await store.claim(
                    key="k", message_id="k", operation="aml_screening", fingerprint="fp", owner="o",
                    lease_s=30, retention_s=3600,
                )  # fmt: skip
        assert scope.cancelled_caught
        store._run_batch = run_batch  # type: ignore[method-assign]
        record = await store.get("k")
        assert record is not None and record.owner == "o"
    finally:
        await store.close()
