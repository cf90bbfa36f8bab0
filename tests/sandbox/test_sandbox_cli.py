"""``idv-sandbox``: the CLI as a real process, plus its argument validation."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from sandbox.cli import main
from sandbox.testing import SandboxAdmin
from tests.sandbox.didit_webhook_check import check_delivery

REPO_ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def _sandbox_process(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[tuple[str, list[str]]]:
    """Run ``python -m sandbox`` until the block ends; yields the URL and, after SIGTERM, its stderr lines."""
    ready = tmp_path / "ready"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("IDV_SANDBOX_")}
    full_env.update(env or {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandbox", "--port", "0", "--ready-file", str(ready), *args],
        cwd=REPO_ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"sandbox did not start: {proc.communicate(timeout=5)}")
            time.sleep(0.05)
        yield ready.read_text().strip(), lines
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
        lines.extend(stderr.splitlines())
        assert proc.returncode == 0, stderr
        assert not ready.exists()


def test_cli_serves_until_sigterm(tmp_path: Path) -> None:
    body = {"full_name": "Secret Person", "vendor_data": "REVIEW"}
    with _sandbox_process(tmp_path, "--api-key", "cli-key", "--log-level", "DEBUG") as (url, lines):
        with httpx.Client(base_url=url, headers={"x-api-key": "cli-key"}) as client:
            response = client.post("/v3/aml/", json=body, headers={"idempotency-key": "c1"})
            assert response.status_code == 200
            assert response.json()["aml"]["status"] == "In Review"
            assert client.get("/_admin/stats").json()["side_effects"] == 1
    output = "\n".join(lines)
    assert "POST /v3/aml/ -> 200" in output
    assert "cli-key" not in output
    assert "Secret Person" not in output


def test_cli_keys_from_env_and_file_and_fault_flags(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("file-key-1\nfile-key-2, file-key-3\n")
    env = {
        "IDV_SANDBOX_API_KEYS": "env-key-1,env-key-2",
        "IDV_SANDBOX_API_KEYS_FILE": str(keys_file),
        "IDV_SANDBOX_OUT_OF_CREDIT_KEYS": "broke",
    }
    args = ("--script", "500,ok", "--latency-ms", "1", "--seed", "3", "--rate-limit-per-min", "600")
    with _sandbox_process(tmp_path, *args, env=env) as (url, _):
        with httpx.Client(base_url=url) as client:
            faults = client.get("/_admin/faults").json()
            assert faults["script"] == ["500", "ok"]
            assert faults["seed"] == 3
            statuses = [
                client.post(
                    "/v3/aml/", json={"full_name": "x"}, headers={"x-api-key": key, "idempotency-key": key}
                ).status_code
                for key in ("env-key-1", "file-key-3", "file-key-1", "nope", "broke")
            ]
            assert statuses == [500, 200, 200, 401, 403]


def test_cli_didit_profile_from_env(tmp_path: Path) -> None:
    env = {"IDV_SANDBOX_PROFILE": "didit", "IDV_SANDBOX_API_KEYS": "k"}
    with _sandbox_process(tmp_path, "--max-body-mb", "2", env=env) as (url, _):
        with httpx.Client(base_url=url, headers={"x-api-key": "k"}) as client:
            body = {"workflow_id": "wf", "vendor_data": "subj", "metadata": {"idv_key": "m1"}}
            first = client.post("/v3/session/", json=body)
            second = client.post("/v3/session/", json=body)
            assert (first.status_code, second.status_code) == (201, 200)
            assert first.json()["session_id"] == second.json()["session_id"]
            too_big = client.post("/v3/face-match/", files={"user_image": ("a.jpg", b"x" * 3_000_000)})
            assert too_big.status_code == 413
            assert client.get("/_admin/effects").json()["per_idv_key"] == {"m1": 1}


def test_cli_didit_applicant_and_webhooks(tmp_path: Path) -> None:
    received: list[tuple[bytes, dict[str, str]]] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((raw, dict(self.headers)))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    secret_file = tmp_path / "secret"
    secret_file.write_text("file-secret-123\n")
    env = {"IDV_SANDBOX_API_KEYS": "k", "IDV_SANDBOX_WEBHOOK_SECRET_FILE": str(secret_file)}
    args = (
        "--profile",
        "didit",
        "--applicant-delay-ms",
        "100",
        "--webhook-url",
        f"http://127.0.0.1:{hook.server_port}/h",
    )
    try:
        with _sandbox_process(tmp_path, *args, "--log-level", "DEBUG", env=env) as (url, lines):
            admin = SandboxAdmin(url)
            with httpx.Client(base_url=url, headers={"x-api-key": "k"}) as client:
                created = client.post("/v3/session/", json={"workflow_id": "wf", "vendor_data": "s DECLINE"})
                assert created.status_code == 201
            deadline = time.monotonic() + 10
            while len(received) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert admin.wait_webhooks_idle()["pending"] == 0
    finally:
        hook.shutdown()
    assert [json.loads(raw)["status"] for raw, _ in received] == ["In Progress", "Declined"]
    for raw, headers in received:
        checks = check_delivery("file-secret-123", raw, headers, now=time.time())
        assert checks == {"raw": True, "v2": True, "simple": True, "fresh": True}
    assert "file-secret-123" not in "\n".join(lines)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ([], {}, "no API key"),
        (["--api-key", "k", "--profile", "veriff"], {}, "--profile"),
        (["--api-key", "k", "--webhook-url", "http://h/"], {}, "secret"),
        (["--api-key", "k", "--webhook-url", "h"], {"IDV_SANDBOX_WEBHOOK_SECRET": "s"}, "webhook_url"),
        (["--api-key", "k"], {"IDV_SANDBOX_WEBHOOK_SECRET_FILE": "/nonexistent/s"}, "WEBHOOK_SECRET_FILE"),
        (["--api-key", "k", "--script", "500,teapot"], {}, "teapot"),
        (["--api-key", "k", "--error-rate", "2"], {}, "--error-rate"),
        (["--api-key", "k", "--port", "70000"], {}, "--port"),
        ([], {"IDV_SANDBOX_API_KEYS_FILE": "/nonexistent/keys"}, "IDV_SANDBOX_API_KEYS_FILE"),
    ],
)
def test_cli_rejects_bad_settings_in_one_line(args: list[str], env: dict[str, str], message: str) -> None:
    clean_env = {k: None for k in os.environ if k.startswith("IDV_SANDBOX_")}
    result = CliRunner().invoke(main, args, env={**clean_env, **env})
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_cli_port_in_use(tmp_path: Path) -> None:
    with _sandbox_process(tmp_path, "--api-key", "k") as (url, _):
        port = url.rsplit(":", 1)[1]
        result = CliRunner().invoke(main, ["--api-key", "k", "--port", port])
    assert result.exit_code == 1
    assert "cannot listen" in result.output
