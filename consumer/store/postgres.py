"""PostgreSQL dedupe store (asyncpg): the same contract as SQLite, for several daemons on several hosts.

Every state change is a conditional ``UPDATE`` (autocommit) whose ``WHERE`` clause *is* the
compare-and-set. The sessions run at READ COMMITTED (pinned per connection), which is what makes that
safe under concurrency: when two statements race for one row, the second waits for the first to commit
and then re-evaluates its ``WHERE`` clause against the row as the first left it. So of twenty concurrent
take-overs of an expired lease exactly one matches ``lease_until <= now``, and an owner whose lease was
taken over finds ``owner = v.owner`` false and gets :class:`~consumer.errors.LeaseLost`.

**Batched writer.** Like the SQLite writer's group commit, callers queue their transitions (claim,
complete, release, renew) and a batch runs *one statement per kind* for everything queued of that kind
(up to ``max_batch``), each field passed as an array and joined with ``unnest``; up to ``max_inflight``
batches run at once, each on its own pooled connection. Each row keeps its own compare-and-set in the
statement's ``WHERE``; a key the statement did not return is that caller's LeaseLost (or, for a claim,
a lost race: it looks again). A key appears at most once in running batches: its next operation waits
for the next batch, so one key's transitions run one after the other, in order. Keys are sorted, so two
daemons lock shared rows in the same order.

A batch of claims works in at most a few statements, usually one, decided by
:func:`~consumer.store.base.decide_claim`:

1. ``INSERT … SELECT FROM unnest(…) ON CONFLICT (key) DO NOTHING RETURNING``, with a fallback read of the
   existing rows in the same statement. New keys are ACQUIRED here. For an existing key the row read
   decides: CONFLICT if the fingerprint differs (checked before anything else, on every path that could
   return a stored outcome), DONE for COMPLETED or FAILED, BUSY for a live lease.
2. RELEASED, or IN_PROGRESS with an expired lease: one take-over ``UPDATE`` for all of them that repeats
   those conditions (and the fingerprint) in its ``WHERE``; our own live lease whose claim's answer was
   lost: one re-enter ``UPDATE``. A key another claimant got first matches nothing and looks again.
3. The fallback read uses the statement's snapshot. A row inserted by a transaction that committed after
   the snapshot was taken (a concurrent claimant of the same key) makes the ``INSERT`` do nothing yet is
   invisible to the read; that key is in neither half of the answer and simply looks again.

All times come from :attr:`DedupeStore.clock` and are sent as parameters, never ``now()`` in SQL, so one
clock decides every lease (and tests can move it). Daemons on different hosts compare each other's
``lease_until`` against their own clock: keep clocks synchronised and leases much longer than the skew.

Driver and network failures become :class:`~consumer.errors.StoreError` (retriable: the pipeline backs
off and the message waits); a failed batch fails each caller in it that had no answer yet, with a
StoreError of its own. Callers are shielded from cancellation, like the SQLite writer's: a caller
cancelled while its batch runs still learns whether its transition happened, so it can hand a claimed key
back. ``command_timeout`` bounds how long that can take.

The schema is versioned: :data:`MIGRATIONS` is applied in order by :func:`migrate`, inside one
transaction holding an advisory lock, so daemons starting together do not race to create tables.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import anyio
import asyncpg

from consumer.errors import StoreError
from consumer.model import Claim, ClaimStatus, Outcome, Record, State
from consumer.store import base, pgsql, redact
from consumer.store.base import CONFLICT_LIST, ClaimRequest, Clock, Decision, DedupeStore, empty_counts
from consumer.store.pgbatch import Batcher, Op, acquired, owned
from consumer.store.pgsql import MIGRATIONS, SCHEMA_VERSION, _rowcount, _where, migrate, migrate_url

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "PostgresStore", "migrate", "migrate_url"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class PostgresStore(DedupeStore):
    #: Rows deleted per statement by :meth:`purge_expired` (short transactions, bounded lock time).
    purge_batch = 5000

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        clock: Clock | None = None,
        connect_timeout: float = 10.0,
        command_timeout: float = 30.0,
        max_batch: int = 256,
        max_inflight: int | None = None,
    ) -> None:
        super().__init__(clock or time.time)
        self.url = url
        self.min_size = min_size
        self.max_size = max_size
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._pool: Any = None
        self._writer = Batcher(
            self._execute,
            max_batch=max_batch,
            max_inflight=max_inflight or min(max_size, 4),
            redact=lambda text: redact(text, self.url),
        )

    @property
    def batches(self) -> int:
        """Batches the writer has run (for tests and benchmarks; ``_writer.ops`` counts transitions)."""
        return self._writer.batches

    def __repr__(self) -> str:
        return f"PostgresStore({_where(self.url)!r})"

    # -- lifecycle -------------------------------------------------------------------------------------

    def _server_settings(self) -> dict[str, str]:
        settings = {
            # The compare-and-set reasoning in the module docstring assumes READ COMMITTED; a stricter
            # server default would turn lost races into serialization errors (safe, but needless retries).
            "default_transaction_isolation": "read committed",
        }
        if "application_name" not in parse_qs(urlsplit(self.url).query):
            settings["application_name"] = "idv-consumer"
        return settings

    async def open(self) -> None:
        if self._pool is not None:
            return
        where = _where(self.url)
        try:
            pool = await asyncpg.create_pool(
                self.url,
                min_size=self.min_size,
                max_size=self.max_size,
                timeout=self.connect_timeout,
                command_timeout=self.command_timeout,
                server_settings=self._server_settings(),
                connection_class=pgsql._StoreConnection,
            )
        except pgsql._OPEN_ERRORS as exc:  # with ValueError: asyncpg could not parse the DSN
            # `from None`: the driver's exception (and its traceback) may carry the DSN and password.
            raise StoreError(
                redact(f"cannot open the PostgreSQL store at {where}: {type(exc).__name__}: {exc}", self.url)
            ) from None
        try:
            async with pool.acquire(timeout=self.connect_timeout) as conn:
                version = await migrate(conn)
        except BaseException as exc:
            pool.terminate()
            if isinstance(exc, pgsql._DB_ERRORS):
                raise StoreError(
                    redact(f"cannot migrate the PostgreSQL store at {where}: {exc}", self.url)
                ) from None
            raise
        self._pool = pool
        log.info("dedupe store open: PostgreSQL at %s, schema version %d", where, version)

    async def close(self) -> None:
        if self._pool is None:
            return
        await self._writer.drain()  # queued and running transitions finish first: their callers wait
        pool, self._pool = self._pool, None
        try:
            with anyio.fail_after(self.command_timeout):
                await pool.close()
        except TimeoutError:
            log.warning(
                "PostgreSQL pool did not close in %.0fs; terminating its connections", self.command_timeout
            )
            pool.terminate()

    async def _run(self, what: str, fn: Callable[[Any], Awaitable[T]]) -> T:
        pool = self._pool
        if pool is None:
            raise StoreError("store is not open")
        try:
            # Shielded: a cancelled caller still learns whether its transition happened (see docstring).
            with anyio.CancelScope(shield=True):
                async with pool.acquire(timeout=self.connect_timeout) as conn:
                    result = await fn(conn)
        except pgsql._DB_ERRORS as exc:
            message = f"PostgreSQL {what} failed: {type(exc).__name__}: {exc}"
            raise StoreError(redact(message, self.url)) from exc
        return result

    # -- the batched writer ----------------------------------------------------------------------------

    def _submit(self, kind: str, key: str, args: tuple[Any, ...]) -> Awaitable[Any]:
        if self._pool is None:
            raise StoreError("store is not open")
        return self._writer.submit(kind, key, args)

    async def _execute(self, kind: str, ops: list[Op]) -> None:
        async with self._pool.acquire(timeout=self.connect_timeout) as conn:
            await _BATCH_HANDLERS[kind](conn, ops, self.clock)

    # -- operations ------------------------------------------------------------------------------------

    async def _claim(self, *, request: ClaimRequest) -> Claim:
        claim: Claim = await self._submit("claim", request.key, (request,))
        return claim

    async def _complete(self, key: str, owner: str, outcome: Outcome, *, failed: bool = False) -> Record:
        state = State.FAILED if failed else State.COMPLETED
        record: Record = await self._submit("complete", key, (owner, state.value, base.dump_outcome(outcome)))
        return record

    async def _release(self, key: str, owner: str, error: str) -> None:
        await self._submit("release", key, (owner, error[:200]))

    async def _renew(self, key: str, owner: str, lease_s: float) -> None:
        await self._submit("renew", key, (owner, lease_s))

    async def record_conflict(
        self, *, key: str, message_id: str, fingerprint: str, stored_fingerprint: str, source: str
    ) -> None:
        async def fn(conn: Any) -> None:
            await conn.execute(
                "INSERT INTO idempotency_conflicts"
                " (key, message_id, fingerprint, stored_fingerprint, source, seen_at)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                *(key, message_id, fingerprint, stored_fingerprint, source, self.clock()),
            )

        await self._run("record_conflict", fn)

    async def get(self, key: str) -> Record | None:
        async def fn(conn: Any) -> Record | None:
            row = await conn.fetchrow(pgsql._GET_SQL, key)
            return base.record_from_row(row) if row is not None else None

        return await self._run("get", fn)

    async def conflicts(self, message_id: str | None = None) -> list[dict[str, Any]]:
        sql = f"SELECT {CONFLICT_LIST} FROM idempotency_conflicts"  # noqa: S608 - constant columns
        args: tuple[Any, ...] = ()
        if message_id is not None:
            sql += " WHERE message_id = $1"
            args = (message_id,)

        async def fn(conn: Any) -> list[dict[str, Any]]:
            return [dict(row.items()) for row in await conn.fetch(sql + " ORDER BY id", *args)]

        return await self._run("conflicts", fn)

    async def counts(self) -> dict[str, int]:
        async def fn(conn: Any) -> dict[str, int]:
            out = empty_counts()
            rows = await conn.fetch("SELECT state, count(*) AS n FROM idempotency_records GROUP BY state")
            for row in rows:
                out[row["state"]] = row["n"]
            return out

        return await self._run("counts", fn)

    async def _purge_all(self, fn: Callable[[Any], Awaitable[str]]) -> int:
        """Run a ``DELETE … LIMIT purge_batch`` statement until it deletes fewer; the rows deleted."""
        total = 0
        while (deleted := _rowcount(await self._run("purge_expired", fn))) >= self.purge_batch:
            total += deleted
        return total + deleted

    async def purge_expired(self) -> int:
        async def fn(conn: Any) -> str:
            status: str = await conn.execute(pgsql._PURGE_SQL, self.clock(), self.purge_batch)
            return status

        async def conflicts(conn: Any) -> str:
            status: str = await conn.execute(pgsql._PURGE_CONFLICTS_SQL, self.purge_batch)
            return status

        total = await self._purge_all(fn)
        if gone := await self._purge_all(conflicts):
            log.info("purged %d conflict log entries whose record expired", gone)
        return total


async def _claim_batch(conn: Any, ops: list[Op], clock: Clock) -> None:
    """Claims: one insert-or-read statement, then one take-over and one re-enter statement for the
    keys that need them, all decided by :func:`~consumer.store.base.decide_claim`. A key that lost a
    race (its row changed, or was inserted by a concurrent claimant after the statement's snapshot)
    looks again in the next round, with the others that did."""
    seen: dict[int, Record] = {}
    todo = ops
    for _ in range(pgsql._CLAIM_ROUNDS):
        if not todo:
            return
        now = clock()
        asks: list[ClaimRequest] = [op.args[0] for op in todo]
        rows = await conn.fetch(
            pgsql._CLAIM_SQL,
            [ask.key for ask in asks],
            [ask.message_id for ask in asks],
            [ask.operation for ask in asks],
            [ask.fingerprints[0] for ask in asks],
            [ask.owner for ask in asks],
            [now + ask.lease_s for ask in asks],
            [now + ask.retention_s for ask in asks],
            now,
        )
        found = {row["key"]: row for row in rows}
        again: list[Op] = []
        take_over: list[tuple[Op, Record]] = []
        reenter: list[tuple[Op, Record]] = []
        for op in todo:
            row = found.get(op.key)
            if row is None:
                again.append(op)  # inserted concurrently, not yet visible to this snapshot
                continue
            record = base.record_from_row(row)
            seen[id(op)] = record
            if row["inserted"]:
                op.set(Claim(ClaimStatus.ACQUIRED, record))
                continue
            decision = op.args[0].decide(record, now)
            if decision is Decision.TAKE_OVER:
                take_over.append((op, record))
            elif decision is Decision.REENTER:
                reenter.append((op, record))
            else:  # CONFLICT, DONE, BUSY: nothing to write
                op.set(Claim(decision.status, record))
        if take_over:
            retention = [now + op.args[0].retention_s for op, _ in take_over]
            rows = await conn.fetch(pgsql._TAKE_OVER_SQL, *_leases(take_over, now), retention, now)
            again.extend(acquired(take_over, rows))
        if reenter:
            rows = await conn.fetch(pgsql._REENTER_SQL, *_leases(reenter, now), now)
            again.extend(acquired(reenter, rows))  # changed since read (expired, taken over)
        todo = sorted(again, key=lambda op: op.key)
    for op in todo:  # still racing after every round: BUSY (the caller waits and retries)
        if (last := seen.get(id(op))) is not None:
            op.set(Claim(ClaimStatus.BUSY, last))
        else:
            op.error = StoreError(f"claim of {op.key} kept racing with concurrent writers")
            op.finished = True


async def _complete_batch(conn: Any, ops: list[Op], clock: Clock) -> None:
    # args: (owner, state, outcome JSON)
    rows = await conn.fetch(
        pgsql._COMPLETE_SQL,
        [op.key for op in ops],
        [op.args[0] for op in ops],
        [op.args[1] for op in ops],
        [op.args[2] for op in ops],
        clock(),
    )
    found = {row["key"]: row for row in rows}
    for op in ops:
        row = found.get(op.key)
        if row is None:
            op.lost()
        else:
            op.set(base.record_from_row(row))


async def _release_batch(conn: Any, ops: list[Op], clock: Clock) -> None:
    # args: (owner, error)
    rows = await conn.fetch(
        pgsql._RELEASE_SQL, [op.key for op in ops], [op.args[0] for op in ops], [op.args[1] for op in ops],
        clock(),
    )  # fmt: skip
    owned(ops, rows)


async def _renew_batch(conn: Any, ops: list[Op], clock: Clock) -> None:
    # args: (owner, lease_s)
    now = clock()
    rows = await conn.fetch(
        pgsql._RENEW_SQL, [op.key for op in ops], [op.args[0] for op in ops],
        [now + op.args[1] for op in ops], now,
    )  # fmt: skip
    owned(ops, rows)


def _leases(pending: list[tuple[Op, Record]], now: float) -> tuple[list[Any], ...]:
    """The take-over and re-enter statements' first arrays: key, fingerprint read, owner, new lease."""
    return (
        [op.key for op, _ in pending],
        [record.fingerprint for _, record in pending],
        [op.args[0].owner for op, _ in pending],
        [now + op.args[0].lease_s for op, _ in pending],
    )


_BATCH_HANDLERS: dict[str, Callable[[Any, list[Op], Clock], Awaitable[None]]] = {
    "claim": _claim_batch,
    "complete": _complete_batch,
    "release": _release_batch,
    "renew": _renew_batch,
}
