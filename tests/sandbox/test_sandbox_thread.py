"""``run_in_thread``: a sandbox for synchronous fixtures."""

from __future__ import annotations

import httpx
import pytest

from sandbox import SandboxConfig, SandboxThread, run_in_thread

API_KEY = "thread-key"


def test_run_in_thread_serves_and_exposes_state() -> None:
    with run_in_thread(SandboxConfig(api_keys=(API_KEY,))) as sandbox:
        assert sandbox.url == f"http://127.0.0.1:{sandbox.port}"
        with httpx.Client(base_url=sandbox.url, headers={"x-api-key": API_KEY}) as client:
            for _ in range(2):
                response = client.post("/v3/aml/", json={"full_name": "x"}, headers={"idempotency-key": "t1"})
                assert response.status_code == 200
            keys = sandbox.ledger()["keys"]
            assert isinstance(keys, dict)
            assert keys["t1"]["side_effects"] == 1
            assert sandbox.stats()["replays"] == 1

            assert sandbox.set_faults(script=["500"])["script"] == ["500"]
            response = client.post("/v3/aml/", json={"full_name": "x"}, headers={"idempotency-key": "t2"})
            assert response.status_code == 500

            sandbox.reset()
            assert sandbox.stats()["requests"] == 0
            assert client.get("/_admin/stats").json()["requests"] == 0
    sandbox.stop()  # idempotent
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{sandbox.url}/healthz")


def test_call_propagates_exceptions() -> None:
    with run_in_thread() as sandbox:

        def boom(app: object) -> None:
            raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            sandbox.call(boom)
        with pytest.raises(ValueError):
            sandbox.set_faults(error_rate=3)


def test_start_failure_is_raised_in_the_caller() -> None:
    with run_in_thread() as first:
        with pytest.raises(OSError):
            run_in_thread(SandboxConfig(port=first.port))


def test_not_started() -> None:
    handle = SandboxThread()
    with pytest.raises(RuntimeError):
        _ = handle.url
    handle.stop()
