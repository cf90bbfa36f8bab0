"""Workflow chaos run: N ``kyc_workflow`` requests end to end while the daemon and the webhook intake are
SIGKILLed and restarted, with the sandbox's simulated applicants and faulty webhooks.

Everything is real and over HTTP: the sandbox (``didit`` profile, in this process's thread) creates
sessions, its applicant finishes or abandons them, its sender delivers signed webhooks to ``idv-webhooks``
(drops, duplicates, reordering, forged copies; plus drop-after-effect faults on the provider calls);
the intake publishes to the events topic; the daemon (a process, transactional results) runs the
workflows. Invariants checked at the end::

    python -m bench.workflow_chaos --workflows 1000 --daemon-kills 5 --intake-kills 3

* exactly one session per workflow and exactly one AML screening per approved workflow (the provider's
  side effects per ``metadata.idv_key``), none for declined ones;
* exactly one visible final decision (revision 1) per workflow on the results topic (``read_committed``);
* 0 stuck workflows (all ``finished`` or ``abandoned``), 0 lost events (every webhook the intake
  acknowledged is applied in the store).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from bench.chaos_env import daemon_child_env
from bench.common import (
    BOOTSTRAP,
    ROOT,
    committed_offsets,
    create_topic,
    end_offsets,
    free_port,
    publish,
    read_values,
)  # fmt: skip
from consumer.workflows.model import map_status
from consumer.workflows.store import open_workflow_store
from producer.envelope import Envelope
from sandbox import SandboxConfig, run_in_thread
from sandbox.testing import SandboxAdmin

API_KEY = "chaos-key"
SECRET = "chaos-webhook-secret-0123456789"
FINGERPRINT_KEY = "chaos-fingerprint-key-0123456789"
FINAL = ("finished", "abandoned")


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    fh = open(log, "ab")
    try:
        return subprocess.Popen(cmd, env=env, stdout=fh, stderr=fh, stdin=subprocess.DEVNULL, cwd=ROOT)
    finally:
        fh.close()


async def states(store_url: str) -> Counter[str]:
    store = open_workflow_store(store_url)
    async with store:
        return Counter(await store.counts())


async def committed_to_end(group: str, topics: list[str]) -> bool:
    for topic in topics:
        ends = await end_offsets(topic)
        if await committed_offsets(group, topic, sorted(ends)) != ends:
            return False
    return True


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="idv-wfchaos-"))
    store_url = args.store_url or f"sqlite:///{work / 'store.db'}"
    topic = f"wfchaos-{uuid.uuid4().hex[:8]}"
    events = f"{topic}.events"
    for name, parts in ((topic, 8), (f"{topic}.dlq", 8), (f"{topic}.results", 8), (events, 8)):
        await create_topic(name, parts)
    intake_port = free_port()
    rng = random.Random(args.seed)
    config = SandboxConfig(port=0, api_keys=(API_KEY,), profile="didit")
    with run_in_thread(config) as sandbox:
        admin = SandboxAdmin(sandbox.url)
        admin.applicant(delay_s=args.applicant_delay_s, jitter_s=args.applicant_delay_s, abandon_rate=0.1,
                        seed=args.seed)  # fmt: skip
        admin.webhooks(url=f"http://127.0.0.1:{intake_port}/webhooks/didit", secret=SECRET, backoff_s=0.3,
                       max_attempts=5, faults={"drop_rate": 0.1, "duplicate_rate": 0.2, "reorder_rate": 0.2,
                                               "bad_signature_rate": 0.05, "reorder_hold_ms": 2000,
                                               "seed": args.seed})  # fmt: skip
        if args.drop_after_effect > 0:
            admin.faults(drop_after_effect_rate=args.drop_after_effect, seed=args.seed)
        prefix = uuid.uuid4().hex[:8]
        batch = [
            Envelope(f"{prefix}-{i}", "kyc_workflow", f"ap-{'DECLINE-' if i % 3 == 0 else ''}{prefix}-{i}",
                     {"workflow_id": "wf-kyc"})
            for i in range(args.workflows)
        ]  # fmt: skip
        await publish(topic, batch)
        daemon_env = daemon_child_env(
            BOOTSTRAP, topic, f"g-{prefix}", store_url, sandbox.url, API_KEY, FINGERPRINT_KEY,
            events_topic=events, provider="didit", results_transactional="true", workflow_scan_interval_s=1,
            workflow_poll_after_s=args.poll_after_s, workflow_poll_max_s=args.poll_after_s,
            workflow_abandon_after_s=600, provider_timeout_s=3, lease_s=5, health_port=-1,
            log_level=os.environ.get("WFCHAOS_LOG_LEVEL", "WARNING"), commit_interval_s=0.5,
            session_timeout_ms=6000, heartbeat_interval_ms=1000,
        )  # fmt: skip
        intake_env = {k: v for k, v in os.environ.items() if not k.startswith("IDV_")} | {
            "PYTHONPATH": str(ROOT), "IDV_KAFKA_BOOTSTRAP": BOOTSTRAP, "IDV_EVENTS_TOPIC": events,
            "IDV_WEBHOOK_PORT": str(intake_port), "IDV_WEBHOOK_SECRET": SECRET, "IDV_LOG_LEVEL": "WARNING",
        }  # fmt: skip
        daemon_cmd = [sys.executable, "-m", "consumer", "run"]
        intake_cmd = [sys.executable, "-m", "consumer.webhooks.cli"]
        daemon = start(daemon_cmd, daemon_env, work / "daemon.log")
        intake = start(intake_cmd, intake_env, work / "intake.log")
        started = time.monotonic()
        kills = {"daemon": 0, "intake": 0}
        deadline = started + args.timeout_s
        while time.monotonic() < deadline:
            await asyncio.sleep(rng.uniform(2.0, 5.0))
            counts = await states(store_url)
            done = sum(counts[s] for s in FINAL)
            owed = kills["daemon"] < args.daemon_kills or kills["intake"] < args.intake_kills
            if done == args.workflows and not owed:
                break
            if kills["daemon"] < args.daemon_kills and rng.random() < 0.6:
                daemon.send_signal(signal.SIGKILL)
                daemon.wait()
                kills["daemon"] += 1
                daemon = start(daemon_cmd, daemon_env, work / "daemon.log")
            elif kills["intake"] < args.intake_kills:
                intake.send_signal(signal.SIGKILL)
                intake.wait()
                kills["intake"] += 1
                await asyncio.sleep(rng.uniform(0.5, 2.0))  # down a while: deliveries fail, Didit retries
                intake = start(intake_cmd, intake_env, work / "intake.log")
        # Finished in the store is not yet published: a result written by a handler that was then killed
        # is published when its message is redelivered. Done means committed to the end of both topics.
        while time.monotonic() < deadline and not await committed_to_end(f"g-{prefix}", [topic, events]):  # noqa: ASYNC110 - polls the broker
            await asyncio.sleep(1.0)
        elapsed = time.monotonic() - started
        for proc in (daemon, intake):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        counts = await states(store_url)
        store = open_workflow_store(store_url)
        async with store:
            rows = [await store.get(e.message_id) for e in batch]
            applied: set[tuple[str, str]] = set()
            for wf in rows:
                if wf is not None:
                    applied |= {
                        (e["session_id"], e["event_id"])
                        for e in await store.events(wf.message_id, wf.session_id)
                    }
        sessions = admin.effects_per_idv_key("create_session")
        screenings = admin.effects_per_idv_key("aml_screening")
        hooks = admin.webhooks()
        delivered = {d["event_id"] for d in hooks["deliveries"] if d.get("http_status") == 200}
        lost = 0
        for ev in hooks["events"]:
            if ev["event_id"] in delivered:
                identity = f"{ev['webhook_type']}:{map_status(ev['status'])}:{float(ev['created_at']):.3f}"
                lost += (ev["session_id"], identity) not in applied
        results = [orjson.loads(v) for v in await read_values(BOOTSTRAP, f"{topic}.results") if v]
        finals = Counter(
            r["message_id"] for r in results if r.get("operation") == "kyc_workflow" and r["revision"] == 1
        )
    present = [w for w in rows if w is not None]
    approved = [w for w in present if w.decision_status == "approved"]
    declined = [w for w in present if w.decision_status == "declined"]
    report = {
        "workflows": args.workflows,
        "elapsed_s": round(elapsed, 1),
        "kills": kills,
        "states": dict(counts),
        "approved": len(approved),
        "declined": len(declined),
        "decided_by_poll": sum(w.decision_source == "poll" for w in present),
        "webhook_fates": dict(Counter(e["fate"] for e in hooks["events"])),
        "violations": {
            "sessions_not_exactly_one": sum(sessions.get(w.session_key, 0) != 1 for w in present)
            + (args.workflows - len(present)),
            "aml_not_exactly_one_when_approved": sum(screenings.get(w.aml_key, 0) != 1 for w in approved),
            "aml_for_declined": sum(w.aml_key in screenings for w in declined),
            "final_decisions_not_exactly_one": sum(finals.get(e.message_id, 0) != 1 for e in batch),
            "stuck": args.workflows - sum(counts[s] for s in FINAL),
            "lost_events": lost,
        },
        "logs": str(work),
    }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workflows", type=int, default=1000)
    parser.add_argument("--daemon-kills", type=int, default=5)
    parser.add_argument("--intake-kills", type=int, default=3)
    parser.add_argument("--applicant-delay-s", type=float, default=3.0)
    parser.add_argument("--poll-after-s", type=float, default=10.0)
    parser.add_argument("--drop-after-effect", type=float, default=0.02)
    parser.add_argument("--store-url", default="")
    parser.add_argument("--timeout-s", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=1)
    report = asyncio.run(run(parser.parse_args()))
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    sys.exit(0 if not any(report["violations"].values()) else 1)


if __name__ == "__main__":
    main()
