"""``replay --reverify`` on finished ``kyc_workflow`` requests: a new key generation for every step.

The daemon runs as a real process against the real broker and the sandbox's ``didit`` profile over HTTP
(decisions reach it by polling the decision endpoint); the re-verification is the CLI. Checked: one new
session (and one new AML screening when approved) per workflow under the generation's keys in the
sandbox's ledger, the request's own row and final decision untouched, a final decision of its own marked
with the generation, the audit lines, and a second run while the generation waits opening nothing new.
"""

from __future__ import annotations

import sys
import uuid
from collections import Counter
from pathlib import Path

import anyio
import orjson
import pytest

from consumer.workflows.model import Step, Workflow, WState, generation_id, step_key
from consumer.workflows.store import open_workflow_store
from tests.consumer.conftest import (
    Sandbox,
    read_results,
    wait_committed_to_end,
    wait_until,
)
from tests.consumer.workflow_e2e import publish_requests, requests, workflow_daemon, workflow_results

pytestmark = pytest.mark.anyio


async def get_rows(url: str, ids: list[str]) -> dict[str, Workflow]:
    async with open_workflow_store(url) as store:
        return {i: wf for i in ids if (wf := await store.get(i)) is not None}


async def reverify(env: dict[str, str], audit: Path) -> dict[str, int]:
    result = await anyio.run_process(
        [sys.executable, "-m", "consumer", "replay", "--reverify", "--reason", "customer dispute",
         "--audit-file", str(audit), "--yes", "--json"],
        env=env, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    counts: dict[str, int] = orjson.loads(result.stdout)["counts"]
    return counts


async def test_reverify_opens_a_new_generation_of_every_workflow_step(
    kafka_bootstrap: str, topic: str, group: str, didit: Sandbox, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{tmp_path / 'wf.db'}"
    batch = requests(2, uuid.uuid4().hex[:8])
    ids = [e.message_id for e in batch]
    verdict = {ids[0]: "Approved", ids[1]: "Declined"}
    gen1 = [generation_id(m, 1) for m in ids]
    events = await publish_requests(kafka_bootstrap, topic, batch, events=2)
    audit = tmp_path / "audit.jsonl"
    with workflow_daemon(kafka_bootstrap, topic, group, store_url, didit.url, tmp_path / "daemon.log",
                         events=events, workflow_scan_interval_s=0.3, workflow_poll_after_s=0.5,
                         workflow_poll_max_s=1, workflow_abandon_after_s=120) as (proc, env):  # fmt: skip
        await wait_committed_to_end(kafka_bootstrap, group, topic, 60)

        async def decide(row_ids: list[str]) -> dict[str, Workflow]:
            waiting = await get_rows(store_url, row_ids)
            assert set(waiting) == set(row_ids)
            for wf in waiting.values():
                assert wf.session_id is not None
                didit.set_session_status(wf.session_id, verdict[wf.request_id])

            async def finished() -> bool:
                got = await get_rows(store_url, row_ids)
                return all(w.state is WState.FINISHED for w in got.values())

            await wait_until(finished, "workflows finished", timeout=90)
            return await get_rows(store_url, row_ids)

        original = await decide(ids)
        counts = await reverify(env, audit)
        assert counts == {"reverified": 2}, counts
        opened = await get_rows(store_url, gen1)
        assert {w.state for w in opened.values()} == {WState.WAITING}
        assert all(w.generation == 1 and w.request_id in ids for w in opened.values())
        # The same re-verification again while generation 1 waits: resumed, no second new one.
        counts = await reverify(env, audit)
        assert counts == {"reverified (generation resumed)": 2}, counts
        assert await get_rows(store_url, [generation_id(m, 2) for m in ids]) == {}
        final = await decide(gen1)
        await wait_committed_to_end(kafka_bootstrap, group, events, 60)
        proc.stop_cleanly()
    assert await get_rows(store_url, ids) == original  # the request's own rows are untouched
    ns = "idv"
    sessions = didit.effects_per_idv_key("create_session")
    expected = {w.session_key: 1 for w in [*original.values(), *final.values()]}
    assert sessions == expected and len(expected) == 4
    for m in ids:
        assert final[generation_id(m, 1)].session_key == step_key(ns, m, Step.SESSION, 1)
        assert final[generation_id(m, 1)].session_id != original[m].session_id
    screened = didit.effects_per_idv_key("aml_screening")
    assert screened == {original[ids[0]].aml_key: 1, final[gen1[0]].aml_key: 1}
    assert final[gen1[0]].aml_key == step_key(ns, ids[0], Step.AML, 1)

    results = workflow_results(await read_results(kafka_bootstrap, f"{topic}.results", "read_uncommitted"))
    decisions = [r for r in results if r["revision"] == 1]
    assert Counter((r["message_id"], r.get("generation", 0)) for r in decisions) == Counter(
        {(m, g): 1 for m in ids for g in (0, 1)}
    )
    for r in decisions:
        assert r["status"] == verdict[r["message_id"]].lower()
        if r.get("generation") == 1:
            assert r["steps"]["session"]["session_id"] == final[generation_id(r["message_id"], 1)].session_id

    lines = [orjson.loads(line) for line in audit.read_bytes().splitlines()]
    # Two runs, each a line per mutating step (session, AML) of each workflow, all under generation 1.
    assert len(lines) == 8
    assert {(x["message_id"], x["step"], x["key"]) for x in lines} == {
        (m, s.value, step_key(ns, m, s, 1)) for m in ids for s in (Step.SESSION, Step.AML)
    }
    assert all(x["generation"] == 1 and x["mode"] == "reverify" and x["reason"] == "customer dispute"
               and x["operation"] == "kyc_workflow" for x in lines)  # fmt: skip

    shown = await anyio.run_process(
        [sys.executable, "-m", "consumer", "show", ids[0], "--json"], env=env, check=False
    )
    assert shown.returncode == 0, shown.stderr.decode()[-2000:]
    story = orjson.loads(shown.stdout)["workflow"]
    assert story["state"] == "finished" and story["session_id"] == original[ids[0]].session_id
    assert [(g["generation"], g["state"], g["session_id"]) for g in story["generations"]] == [
        (1, "finished", final[gen1[0]].session_id)
    ]
    assert {(s["step"], s["generation"]) for s in story["step_records"]} == {
        (s, g) for s in ("session", "aml") for g in (0, 1)
    }
