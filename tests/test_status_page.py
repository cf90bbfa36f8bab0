"""The daemon's status page in a real browser: headless Chromium (Debian's ``chromium``) driven by
playwright-core (``tests/browser``), against a real daemon process that processed messages from the real
broker with the sandbox provider. The figures the browser sees must be those of ``/metrics``.

The screenshot is kept in ``.run/artifacts/status-page.png``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from producer.envelope import Envelope, encode
from tests.conftest import ROOT, free_port, service_missing
from tests.consumer.conftest import (
    Sandbox,
    daemon_env,
    end_offsets,
    publish_raw,
    start_daemon,
    wait_committed_to_end,
    wait_until,
)

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]

BROWSER_DIR = ROOT / "tests" / "browser"
ARTIFACTS = ROOT / ".run" / "artifacts"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def _browser_tools() -> str:
    """The node binary, with playwright-core installed (``npm ci``) and chromium present; else fail under
    CI, skip elsewhere."""
    node = shutil.which("node")
    if node is None or not Path(CHROMIUM).exists():
        service_missing("node and chromium", "apt-get install -y nodejs npm chromium")
    assert node is not None
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            service_missing("npm", "apt-get install -y npm")
        assert npm is not None
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=BROWSER_DIR,
            capture_output=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            service_missing("playwright-core", "cd tests/browser && npm ci")
    return node


def _metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _expected(text: str) -> dict[str, Any]:
    """The page's figures, computed from ``/metrics`` independently of ``Metrics.snapshot``."""
    m = _metrics(text)
    parts: dict[tuple[str, int], dict[str, Any]] = {}
    for field, name in (("committed", "idv_committed_offset"), ("lag", "idv_consumer_lag")):
        for labels, value in m.get(name, []):
            key = (labels["topic"], int(labels["partition"]))
            parts.setdefault(key, {"topic": key[0], "partition": key[1], "committed": None, "lag": None})
            parts[key][field] = int(value)
    outcomes: dict[str, int] = {}
    dispositions: dict[str, int] = {}
    for labels, value in m.get("idv_messages_finished_total", []):
        if value:
            dispositions[labels["disposition"]] = dispositions.get(labels["disposition"], 0) + int(value)
            if labels["status"] != "none":
                outcomes[labels["status"]] = outcomes.get(labels["status"], 0) + int(value)
    (breaker,) = (v for _, v in m["idv_circuit_breaker_state"])
    return {
        "partitions": [parts[k] for k in sorted(parts)],
        "outcomes": outcomes,
        "dispositions": dispositions,
        "dead_letters": {lbl["reason"]: int(v) for lbl, v in m.get("idv_dead_letters_total", [])},
        "in_doubt": int(sum(v for _, v in m["idv_in_doubt_total"])),
        "in_flight": int(sum(v for _, v in m["idv_messages_in_flight"])),
        "provider_replays": int(sum(v for _, v in m["idv_provider_replays_total"])),
        "breaker": {0: "closed", 1: "half_open", 2: "open"}[int(breaker)],
    }


async def test_status_page_in_headless_chromium_shows_the_metrics(
    kafka_bootstrap: str, topic: str, sandbox: object, sqlite_url: str, tmp_path: Path
) -> None:
    node = _browser_tools()
    sb = Sandbox(sandbox.url)  # type: ignore[attr-defined]
    envs = [
        Envelope(f"msg-{uuid.uuid4()}", op, f"subject-{i}", req)
        for i, (op, req) in enumerate(
            [
                ("aml_screening", {"full_name": "Jane Roe"}),
                ("aml_screening", {"full_name": "John Doe"}),
                ("create_session", {"workflow_id": "wf-1"}),
                ("create_session", {"workflow_id": "wf-2"}),
                ("aml_screening", {"full_name": "Ann Other"}),
            ]
        )
    ]
    records = [(e.key, encode(e), e.headers()) for e in envs]
    records.append((b"subject-x", b"{not json", []))  # one dead letter
    await publish_raw(kafka_bootstrap, topic, records)
    port = free_port()
    group = "g-" + uuid.uuid4().hex[:8]
    env = daemon_env(
        bootstrap=kafka_bootstrap,
        topic=topic,
        group=group,
        store_url=sqlite_url,
        provider_url=sb.url,
        health_port=port,
    )
    proc = start_daemon(env, tmp_path / "daemon.log")
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_committed_to_end(kafka_bootstrap, group, topic)
        ends = await end_offsets(kafka_bootstrap, topic)
        used = {p: end for p, end in ends.items() if end}

        async def scrape() -> dict[str, Any]:
            async with httpx.AsyncClient(timeout=5) as client:
                return _expected((await client.get(base + "/metrics")).text)

        async def settled() -> bool:
            # Every message finished, and every used partition's committed offset shown at its end.
            exp = await scrape()
            shown = {p["partition"]: p for p in exp["partitions"]}
            return sum(exp["dispositions"].values()) == len(records) and all(
                shown.get(p, {}).get("committed") == end and shown[p].get("lag") == 0
                for p, end in used.items()
            )

        await wait_until(settled, "the daemon's gauges to show every partition committed", timeout=30)

        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "status-page.png"
        with anyio.fail_after(120):
            run = await anyio.run_process(
                [node, str(BROWSER_DIR / "status-page.mjs"), base + "/", str(shot)],
                cwd=BROWSER_DIR,
                check=False,
                env={**os.environ, "CHROMIUM": CHROMIUM},
            )
        assert run.returncode == 0, run.stderr.decode()[-3000:]
        seen = orjson.loads(run.stdout.decode().strip().splitlines()[-1])
        expected = await scrape()
    finally:
        proc.terminate()
        code = proc.wait(30)
        proc.kill()
    assert code == 0, proc.log()[-3000:]

    assert seen["status"] == 200 and "default-src 'none'" in seen["csp"]
    assert seen["problems"] == []  # no console errors, no CSP violations
    assert all(url.startswith(base + "/") for url in seen["requests"]), seen["requests"]
    assert seen["reloaded"], "the page did not refresh itself"
    figures = seen["figures"]
    assert figures["scripts"] == 0 and figures["refresh"] == "5"
    for name in ("partitions", "outcomes", "dispositions", "dead_letters", "in_doubt", "in_flight"):
        assert figures[name] == expected[name], name
    assert figures["provider_replays"] == expected["provider_replays"]
    assert figures["breaker"] == expected["breaker"] == "closed"
    assert figures["ready"] == "yes"
    assert figures["dead_letters"] == {"invalid_json": 1}
    assert sum(figures["outcomes"].values()) == len(envs)
    assert figures["dispositions"] == {"completed": len(envs), "invalid": 1}
    assert {p["partition"] for p in figures["partitions"]} >= set(used)
    assert shot.stat().st_size > 1000
