from __future__ import annotations

from pathlib import Path

import pytest

from consumer.errors import ConfigurationError
from consumer.settings import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
FINGERPRINT_KEY = "settings-test-fingerprint-key"
BASE = {"IDV_PROVIDER_API_KEY": "k", "IDV_FINGERPRINT_KEY": FINGERPRINT_KEY}


def test_every_setting_is_documented() -> None:
    text = DOC.read_text()
    names = Settings(provider_api_key="x").env_names() + Settings.secret_file_names()
    missing = [name for name in names if f"`{name}`" not in text]
    assert not missing, f"settings missing from docs/configuration.md: {missing}"


def test_reads_env_and_converts_types() -> None:
    s = Settings.from_env({**BASE, "IDV_MAX_IN_FLIGHT": "8", "IDV_LEASE_S": "30.5"})
    assert s.max_in_flight == 8 and s.lease_s == 30.5 and s.provider_api_key == "k"


def test_secret_from_file(tmp_path: Path) -> None:
    f = tmp_path / "key"
    f.write_text("file-key\n")
    s = Settings.from_env({**BASE, "IDV_PROVIDER_API_KEY": "env-key", "IDV_PROVIDER_API_KEY_FILE": str(f)})
    assert s.provider_api_key == "file-key"
    assert "file-key" not in repr(s)


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({}, "IDV_PROVIDER_API_KEY: is required"),
        ({**BASE, "IDV_MAX_IN_FLIGHT": "many"}, "IDV_MAX_IN_FLIGHT: invalid value"),
        ({**BASE, "IDV_MAX_IN_FLIGHT": "0"}, "IDV_MAX_IN_FLIGHT"),
        ({**BASE, "IDV_LEASE_S": "5"}, "IDV_LEASE_S"),
        ({**BASE, "IDV_AUTO_OFFSET_RESET": "middle"}, "IDV_AUTO_OFFSET_RESET"),
        ({"IDV_PROVIDER_API_KEY_FILE": "/nonexistent/key"}, "IDV_PROVIDER_API_KEY_FILE: cannot read"),
        ({**BASE, "IDV_PROVIDER_URL": "ftp://x"}, "IDV_PROVIDER_URL"),
        ({**BASE, "IDV_MAX_BUFFERED": "64"}, "IDV_MAX_BUFFERED: must be at least"),
        ({**BASE, "IDV_EVENT_LOOP": "trio"}, "IDV_EVENT_LOOP"),
        ({**BASE, "IDV_PROVIDER_TRANSPORT": "curl"}, "IDV_PROVIDER_TRANSPORT"),
        ({"IDV_PROVIDER_API_KEY": "k"}, "IDV_FINGERPRINT_KEY: is required"),
        ({**BASE, "IDV_FINGERPRINT_KEY": "short"}, "IDV_FINGERPRINT_KEY: must be at least 16 characters"),
        ({**BASE, "IDV_FINGERPRINT_KEY_FILE": "/nonexistent/fp"}, "IDV_FINGERPRINT_KEY_FILE: cannot read"),
    ],
)
def test_invalid_settings_name_the_variable(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        Settings.from_env(env)


def test_fault_spec_is_validated() -> None:
    from consumer.faults import FaultPoints

    with pytest.raises(ConfigurationError, match="IDV_FAULT_KILL_AT"):
        FaultPoints("somewhere:1")
    assert FaultPoints("after_record:3").at == 3


def test_config_file_is_read_and_environment_wins(tmp_path: Path) -> None:
    cfg = tmp_path / "idv.toml"
    cfg.write_text('[idv]\nmax_in_flight = 32\nlog_format = "text"\nresults_transactional = true\n')
    s = Settings.from_env({**BASE, "IDV_CONFIG_FILE": str(cfg), "IDV_MAX_IN_FLIGHT": "8"})
    assert s.max_in_flight == 8  # the environment overrides the file
    assert s.log_format == "text" and s.results_transactional is True


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("max_in_flihgt = 3\n", "unknown setting 'max_in_flihgt'"),
        ("max_in_flight = 'many'\n", "max_in_flight: invalid value"),
        ("max_in_flight = [1]\n", "single value"),
        ("max_in_flight = \n", "not valid TOML"),
    ],
)
def test_bad_config_file_is_one_clear_error(tmp_path: Path, content: str, fragment: str) -> None:
    cfg = tmp_path / "idv.toml"
    cfg.write_text(content)
    with pytest.raises(ConfigurationError, match=fragment):
        Settings.from_env({**BASE, "IDV_CONFIG_FILE": str(cfg)})


def test_event_loop_choice() -> None:
    from consumer.cli import event_loop_options

    assert event_loop_options("asyncio") == {}
    assert event_loop_options("auto") == {"use_uvloop": True}  # uvloop is a dependency on this platform
    assert event_loop_options("uvloop") == {"use_uvloop": True}


def test_fingerprint_key_from_file_and_never_shown(tmp_path: Path) -> None:
    f = tmp_path / "fp-key"
    f.write_text("a-fingerprint-key-from-a-file\n")
    s = Settings.from_env({"IDV_PROVIDER_API_KEY": "k", "IDV_FINGERPRINT_KEY_FILE": str(f)})
    assert s.fingerprint_key == "a-fingerprint-key-from-a-file"
    assert "a-fingerprint-key-from-a-file" not in repr(s) and "from-a-file" not in str(s)


def test_missing_fingerprint_key_is_one_line() -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({"IDV_PROVIDER_API_KEY": "k"})
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("IDV_FINGERPRINT_KEY: is required")


def test_store_url_password_is_never_shown(tmp_path: Path) -> None:
    url = "postgresql://idv:S3cr%40t-pw@db.example:5432/idv"
    s = Settings.from_env({**BASE, "IDV_STORE_URL": url})
    assert s.store_url == url
    for text in (repr(s), str(s)):
        assert "S3cr" not in text
        assert "postgresql://idv:***@db.example:5432/idv" in text
    assert s.store_url_redacted == "postgresql://idv:***@db.example:5432/idv"


def test_store_url_from_file(tmp_path: Path) -> None:
    f = tmp_path / "store-url"
    f.write_text("postgresql://idv:file-pw@127.0.0.1:5432/idv\n")
    s = Settings.from_env({**BASE, "IDV_STORE_URL": "sqlite:///x.db", "IDV_STORE_URL_FILE": str(f)})
    assert s.store_url == "postgresql://idv:file-pw@127.0.0.1:5432/idv"  # the file wins, like every secret
    assert "file-pw" not in repr(s)


def test_the_daemon_refuses_to_start_without_a_fingerprint_key(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDV_")}
    env.update(IDV_PROVIDER_API_KEY="k", PYTHONPATH=str(root))
    result = subprocess.run(
        [sys.executable, "-m", "consumer", "run"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "IDV_FINGERPRINT_KEY: is required" in line


def test_a_small_in_flight_ceiling_keeps_the_default_concurrency_floor_valid() -> None:
    """IDV_MAX_IN_FLIGHT below the default IDV_CONCURRENCY_MIN (8) starts: the floor is capped at the
    ceiling (a daemon with 4 workers once refused to start)."""
    settings = Settings.from_env({**BASE, "IDV_MAX_IN_FLIGHT": "4"})
    assert settings.max_in_flight == 4 and settings.concurrency_min == 8
    with pytest.raises(ConfigurationError, match="IDV_CONCURRENCY_MIN"):
        Settings.from_env({**BASE, "IDV_CONCURRENCY_MIN": "0"})
