"""``idv-webhooks`` as a real process: settings, start-up failures with their exit codes, one delivery end
to end, a graceful SIGTERM, and logs that never carry a payload, a signature or a secret."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from consumer.errors import ConfigurationError
from consumer.exits import EXIT_BROKER, EXIT_CONFIG, EXIT_OK, EXIT_TOPIC_MISSING
from consumer.webhooks import WebhookSettings
from tests.conftest import ROOT, create_topic, free_port, random_topic_name
from tests.consumer.test_webhooks_intake import SECRET, delivery, kcat_read

DOC = ROOT / "docs" / "configuration.md"


# -- settings ------------------------------------------------------------------------------------------


def test_every_webhook_setting_is_documented() -> None:
    text = DOC.read_text()
    names = WebhookSettings(webhook_secret="x").env_names() + WebhookSettings.secret_file_names()
    missing = [name for name in names if f"`{name}`" not in text]
    assert not missing, f"webhook settings missing from docs/configuration.md: {missing}"


def test_settings_from_env_and_secret_files(tmp_path: Path) -> None:
    current, previous = tmp_path / "current", tmp_path / "previous"
    current.write_text("from-file-current\n")
    previous.write_text("from-file-previous\n")
    s = WebhookSettings.from_env(
        {
            "IDV_WEBHOOK_SECRET": "ignored-when-the-file-is-given",
            "IDV_WEBHOOK_SECRET_FILE": str(current),
            "IDV_WEBHOOK_SECRET_PREVIOUS_FILE": str(previous),
            "IDV_EVENTS_TOPIC": "events.custom",
            "IDV_WEBHOOK_PORT": "8099",
            "IDV_WEBHOOK_PATH": "/hooks/didit",
            "IDV_WEBHOOK_TIMESTAMP_WINDOW_S": "120",
        }
    )
    assert s.secrets == ("from-file-current", "from-file-previous")
    assert (s.events_topic, s.webhook_port, s.webhook_path, s.webhook_timestamp_window_s) == (
        "events.custom",
        8099,
        "/hooks/didit",
        120.0,
    )
    assert "from-file" not in repr(s)
    defaults = WebhookSettings.from_env({"IDV_WEBHOOK_SECRET": "s"})
    assert (defaults.events_topic, defaults.webhook_path, defaults.webhook_timestamp_window_s) == (
        "idv.provider-events",
        "/webhooks/didit",
        300.0,
    )


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({}, "IDV_WEBHOOK_SECRET: is required"),
        ({"IDV_WEBHOOK_SECRET": "a", "IDV_WEBHOOK_SECRET_PREVIOUS": "a"}, "IDV_WEBHOOK_SECRET_PREVIOUS"),
        ({"IDV_WEBHOOK_SECRET": "a", "IDV_WEBHOOK_PORT": "http"}, "IDV_WEBHOOK_PORT: invalid value"),
        ({"IDV_WEBHOOK_SECRET": "a", "IDV_WEBHOOK_PATH": "webhooks"}, "IDV_WEBHOOK_PATH"),
        ({"IDV_WEBHOOK_SECRET": "a", "IDV_WEBHOOK_PATH": "/metrics"}, "IDV_WEBHOOK_PATH: must not"),
        (
            {"IDV_WEBHOOK_SECRET": "a", "IDV_WEBHOOK_TIMESTAMP_WINDOW_S": "0"},
            "IDV_WEBHOOK_TIMESTAMP_WINDOW_S",
        ),
        ({"IDV_WEBHOOK_SECRET": "a", "IDV_KAFKA_SASL_USERNAME": "u"}, "IDV_KAFKA_SASL_USERNAME"),
        ({"IDV_WEBHOOK_SECRET_FILE": "/nonexistent/secret"}, "IDV_WEBHOOK_SECRET_FILE: cannot read"),
    ],
)
def test_invalid_settings_name_the_variable(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        WebhookSettings.from_env(env)


# -- the process ---------------------------------------------------------------------------------------


def intake_env(bootstrap: str, topic: str, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDV_")}
    env.update(
        PYTHONPATH=str(ROOT),
        IDV_KAFKA_BOOTSTRAP=bootstrap,
        IDV_EVENTS_TOPIC=topic,
        IDV_WEBHOOK_PORT=str(port),
        IDV_WEBHOOK_SECRET=SECRET,
        IDV_WEBHOOK_PUBLISH_TIMEOUT_S="3",
        IDV_LOG_FORMAT="json",
        IDV_LOG_LEVEL="DEBUG",  # the most talkative setting still logs no payload
    )
    env.update(extra)
    return env


def start(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "consumer.webhooks.cli"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


async def wait_ready(
    client: httpx.AsyncClient, proc: subprocess.Popen[bytes], port: int, timeout: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"idv-webhooks exited {proc.returncode}: {err!r}")
        try:
            if (await client.get(f"http://127.0.0.1:{port}/readyz", timeout=1)).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await anyio.sleep(0.1)
    raise AssertionError("idv-webhooks did not become ready")


@pytest.mark.kafka
@pytest.mark.anyio
async def test_one_delivery_end_to_end_then_a_graceful_sigterm(kafka_bootstrap: str) -> None:
    topic = await create_topic(kafka_bootstrap, random_topic_name("wh-cli"), 2)
    port = free_port()
    proc = start(intake_env(kafka_bootstrap, topic, port))
    session = str(uuid.uuid4())
    body, headers = delivery(session_id=session)
    bad_body, bad_headers = delivery(session_id=session, secret="some-other-secret")
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            await wait_ready(client, proc, port)
            url = f"http://127.0.0.1:{port}/webhooks/didit"
            assert (await client.post(url, content=body, headers=headers)).status_code == 200
            assert (await client.post(url, content=bad_body, headers=bad_headers)).status_code == 401
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == EXIT_OK, err
    assert [r["key"] for r in kcat_read(kafka_bootstrap, topic)] == [session]

    log = err.decode()
    assert "webhook accepted" in log and "webhook rejected" in log and "webhook intake stopped" in log
    secrets_and_payload: list[Any] = [
        SECRET,
        session,  # only its hash is logged
        headers["X-Signature-V2"],
        headers["X-Signature"],
        bad_headers["X-Signature-V2"],
        "applicant-intake",  # vendor_data
        "Zoë",
        "idv_" + "0" * 32,
        "DiditWebhook",  # no request headers at all (no access log)
    ]
    leaked = [s for s in secrets_and_payload if s in log]
    assert not leaked, f"logged: {leaked}"


@pytest.mark.kafka
@pytest.mark.anyio
async def test_start_up_failures_exit_with_one_line_and_their_code(kafka_bootstrap: str) -> None:
    missing_topic = random_topic_name("wh-none")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    cases = [
        (intake_env(kafka_bootstrap, missing_topic, free_port()), EXIT_TOPIC_MISSING, "does not exist"),
        (intake_env(dead, "idv.provider-events", free_port()), EXIT_BROKER, "Kafka"),
        (
            intake_env(kafka_bootstrap, missing_topic, free_port(), IDV_WEBHOOK_SECRET=""),
            EXIT_CONFIG,
            "required",
        ),
    ]
    for env, code, fragment in cases:
        proc = start(env)
        _, err = proc.communicate(timeout=60)
        last = err.decode().strip().splitlines()[-1]
        assert proc.returncode == code, err
        assert last.startswith("idv-webhooks:") and fragment in last, last
        assert "Traceback" not in err.decode()
