"""The workflow store contract on both backends: every transition one compare-and-set, events applied
once, result events written with their transition or not at all, the state machine's edges enforced."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from consumer.errors import ConfigurationError
from consumer.store import open_store
from consumer.store.postgres import PostgresStore
from consumer.store.sqlite import SqliteStore
from consumer.workflows.model import Event, IllegalTransition, Workflow, WState, step_key
from consumer.workflows.postgres import PostgresWorkflowStore
from consumer.workflows.rules import Change, Result, finalize, on_event
from consumer.workflows.sqlite import SqliteWorkflowStore
from consumer.workflows.store import WorkflowStore, WriteStatus, open_workflow_store
from tests.consumer.conftest import backend_url

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["sqlite", "postgres"])
async def wstore(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[WorkflowStore]:
    async with backend_url(request.param, tmp_path, "wf") as url, open_workflow_store(url) as store:
        yield store


@pytest.mark.parametrize(
    ("url", "path", "synchronous"),
    [
        ("sqlite:///run/dedupe.db", "run/dedupe.db", "FULL"),
        ("sqlite:////var/lib/idv/dedupe.db?synchronous=NORMAL", "/var/lib/idv/dedupe.db", "NORMAL"),
        ("sqlite:///:memory:", ":memory:", "FULL"),
        ("sqlite:///a.db?synchronous=off&x=1", "a.db", "OFF"),
    ],
)
def test_the_workflow_store_reads_a_sqlite_url_as_the_dedupe_store_does(
    url: str, path: str, synchronous: str
) -> None:
    records, workflows = open_store(url), open_workflow_store(url)
    assert isinstance(records, SqliteStore) and isinstance(workflows, SqliteWorkflowStore)
    assert records.path == workflows.path == path
    assert records.synchronous == workflows.synchronous == synchronous


def test_the_workflow_store_takes_the_same_postgres_schemes_and_refuses_others() -> None:
    for url in ("postgresql://u:p@127.0.0.1:5432/idv", "postgres://u:p@127.0.0.1:5432/idv"):
        assert isinstance(open_store(url), PostgresStore)
        workflows = open_workflow_store(url)
        assert isinstance(workflows, PostgresWorkflowStore) and workflows.url == url
    for url in ("mysql://u@h/db", "redis://h:6379/0"):
        with pytest.raises(ConfigurationError, match="unsupported store URL scheme"):
            open_store(url)
        with pytest.raises(ConfigurationError, match="unsupported store URL scheme"):
            open_workflow_store(url)


def new_workflow(mid: str | None = None, *, steps: str = "session,decision,aml") -> Workflow:
    mid = mid or uuid.uuid4().hex
    return Workflow(
        message_id=mid, subject_id="applicant-1", provider_workflow_id="wf-1", steps=steps,
        fingerprint="h1:" + "0" * 64, state=WState.STARTED, version=1, session_id=None,
        session_key=step_key("idv", mid, "session"), aml_key=step_key("idv", mid, "aml"),
        decision_status=None, decision_source=None, latest_status=None, latest_ts=None, aml_status=None,
        aml_ref=None, revision=0, polls=0, due_at=None, deadline=2e9, created_at=1e9, updated_at=1e9,
    )  # fmt: skip


async def waiting(store: WorkflowStore, session: str | None = None) -> Workflow:
    wf = await store.create(new_workflow())
    created = wf.evolve(state=WState.SESSION_CREATED, session_id=session or "s-" + uuid.uuid4().hex,
                        version=2)  # fmt: skip
    assert await store.write(wf, Change(created)) is WriteStatus.OK
    wait = created.evolve(state=WState.WAITING, version=3, due_at=1e9 + 10)
    assert await store.write(created, Change(wait)) is WriteStatus.OK
    return wait


def ev(session: str, status: str, ts: float | None, kind: str = "status.updated") -> Event:
    return Event(session, f"{kind}:{status}:{ts}", kind, status, ts)


async def test_create_is_idempotent(wstore: WorkflowStore) -> None:
    wf = new_workflow()
    first = await wstore.create(wf)
    again = await wstore.create(wf.evolve(subject_id="someone-else"))
    assert first == wf and again == wf  # the stored row, unchanged
    assert await wstore.get(wf.message_id) == wf


async def test_stale_version_writes_nothing(wstore: WorkflowStore) -> None:
    wf = await waiting(wstore)
    moved = wf.evolve(version=wf.version + 1, polls=1)
    assert await wstore.write(wf, Change(moved)) is WriteStatus.OK
    # A writer that read the row before that change loses its compare-and-set, and changes nothing.
    racer = wf.evolve(version=wf.version + 1, polls=7)
    assert await wstore.write(wf, Change(racer)) is WriteStatus.STALE
    assert await wstore.get(wf.message_id) == moved


async def test_concurrent_writers_exactly_one_wins(wstore: WorkflowStore) -> None:
    wf = await waiting(wstore)
    statuses: list[WriteStatus] = []

    async def one(i: int) -> None:
        statuses.append(await wstore.write(wf, Change(wf.evolve(version=wf.version + 1, polls=i))))

    async with anyio.create_task_group() as tg:
        for i in range(1, 21):
            tg.start_soon(one, i)
    assert statuses.count(WriteStatus.OK) == 1 and statuses.count(WriteStatus.STALE) == 19
    stored = await wstore.get(wf.message_id)
    assert stored is not None and stored.version == wf.version + 1


async def test_event_applied_once_and_rolled_back_with_a_lost_cas(wstore: WorkflowStore) -> None:
    wf = await waiting(wstore)
    assert wf.session_id is not None
    approved = ev(wf.session_id, "approved", 100.0)
    change = on_event(wf, approved, 1e9, "events/0@5")
    assert change is not None and change.new.state is WState.DECIDED
    # A stale compare-and-set rolls the event row back with it: the event is not marked applied.
    stale = wf.evolve(version=wf.version - 1)
    stale_change = Change(change.new.evolve(version=wf.version))
    assert await wstore.write(stale, stale_change, approved, "events/0@5") is WriteStatus.STALE
    assert await wstore.events(wf.message_id, wf.session_id) == []
    assert await wstore.write(wf, change, approved, "events/0@5") is WriteStatus.OK
    # The same event again (a duplicate delivery at another offset): nothing written, even with a CAS
    # that would match.
    again = Change(change.new.evolve(version=change.new.version + 1, polls=9))
    assert await wstore.write(change.new, again, approved, "events/0@9") is WriteStatus.DUPLICATE
    stored = await wstore.get(wf.message_id)
    assert stored == change.new
    rows = await wstore.events(wf.message_id, wf.session_id)
    assert [(r["event_id"], r["source"], r["effect"]) for r in rows] == [
        (approved.event_id, "events/0@5", "applied")
    ]


async def test_pending_event_is_claimed_by_its_application(wstore: WorkflowStore) -> None:
    session = "s-" + uuid.uuid4().hex
    early = ev(session, "approved", 50.0)
    assert await wstore.add_pending(early, "events/1@0") is True
    assert await wstore.add_pending(early, "events/1@3") is False  # a duplicate delivery
    assert await wstore.pending(session) == [early]
    wf = await waiting(wstore, session)
    change = on_event(wf, early, 1e9, "requests/0@0")
    assert await wstore.write(wf, change, early, "requests/0@0") is WriteStatus.OK
    assert await wstore.pending(session) == []
    assert await wstore.write(change.new if change else wf, None, early, "x") is WriteStatus.DUPLICATE


async def test_results_are_written_with_their_transition(wstore: WorkflowStore) -> None:
    wf = await waiting(wstore)
    decided = wf.evolve(state=WState.DECIDED, version=wf.version + 1, decision_status="declined",
                        latest_status="declined", decision_source="webhook")  # fmt: skip
    assert await wstore.write(wf, Change(decided)) is WriteStatus.OK
    final = finalize(decided, 1e9 + 5, "events/2@7")
    assert [r.revision for r in final.results] == [1]
    # A lost race writes no result event either.
    loser = finalize(wf.evolve(state=WState.DECIDED, decision_status="declined"), 1e9, "events/2@8")
    with pytest.raises(IllegalTransition):
        await wstore.write(wf, loser)  # waiting → finished is not an edge
    assert await wstore.write(decided, final) is WriteStatus.OK
    assert await wstore.write(decided, finalize(decided, 1e9, "events/2@9")) is WriteStatus.STALE
    at = await wstore.results_at("events/2@7")
    assert at == list(final.results) and await wstore.results_at("events/2@9") == []
    assert await wstore.results_of(wf.message_id) == list(final.results)
    assert isinstance(at[0], Result) and at[0].key == b"applicant-1"


async def test_transition_rule_refuses_illegal_writes(wstore: WorkflowStore) -> None:
    wf = await waiting(wstore)
    decided = wf.evolve(state=WState.DECIDED, version=wf.version + 1, decision_status="approved")
    assert await wstore.write(wf, Change(decided)) is WriteStatus.OK
    for bad in (
        decided.evolve(version=decided.version + 1, decision_status="declined"),  # terminal overwritten
        decided.evolve(version=decided.version + 1, state=WState.WAITING),  # backwards
        decided.evolve(version=decided.version + 2),  # version skipped
        decided.evolve(version=decided.version + 1, session_id="other"),  # session replaced
    ):
        with pytest.raises(IllegalTransition):
            await wstore.write(decided, Change(bad))
    assert await wstore.get(wf.message_id) == decided


async def test_due_lists_waiting_rows_oldest_first(wstore: WorkflowStore) -> None:
    rows = [await waiting(wstore) for _ in range(3)]
    for i, wf in enumerate(rows):
        await wstore.write(wf, Change(wf.evolve(version=wf.version + 1, due_at=100.0 - i)))
    due = await wstore.due(100.0, 2)
    assert [w.message_id for w in due] == [rows[2].message_id, rows[1].message_id]
    assert await wstore.due(97.0, 10) == []
    assert (await wstore.counts())["waiting"] == 3


async def test_purge_removes_only_old_final_workflows_with_their_rows(wstore: WorkflowStore) -> None:
    old_open = await waiting(wstore)
    done = await waiting(wstore)
    assert done.session_id is not None
    decided = done.evolve(state=WState.DECIDED, version=done.version + 1, decision_status="declined",
                          latest_status="declined")  # fmt: skip
    event = ev(done.session_id, "declined", 5.0)
    assert await wstore.write(done, Change(decided), event, "e/0@1") is WriteStatus.OK
    final = finalize(decided, 1e9, "e/0@1")
    assert await wstore.write(decided, final) is WriteStatus.OK
    stray = ev("not-ours", "approved", 1.0)
    await wstore.add_pending(stray, "e/0@2")
    assert await wstore.purge(0.0) == 0  # nothing is that old
    assert await wstore.purge(wstore.clock() + 10) == 1
    assert await wstore.get(done.message_id) is None and await wstore.results_of(done.message_id) == []
    assert await wstore.events(done.message_id, done.session_id) == []
    assert await wstore.pending("not-ours") == []
    assert await wstore.get(old_open.message_id) == old_open  # an open workflow is never purged
