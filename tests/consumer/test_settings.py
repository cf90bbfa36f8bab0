from __future__ import annotations

from pathlib import Path

import pytest

from consumer.errors import ConfigurationError
from consumer.settings import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_every_setting_is_documented() -> None:
    text = DOC.read_text()
    missing = [name for name in Settings(provider_api_key="x").env_names() if f"`{name}`" not in text]
    assert not missing, f"settings missing from docs/configuration.md: {missing}"


def test_reads_env_and_converts_types() -> None:
    s = Settings.from_env({"IDV_PROVIDER_API_KEY": "k", "IDV_MAX_IN_FLIGHT": "8", "IDV_LEASE_S": "30.5"})
    assert s.max_in_flight == 8 and s.lease_s == 30.5 and s.provider_api_key == "k"


def test_secret_from_file(tmp_path: Path) -> None:
    f = tmp_path / "key"
    f.write_text("file-key\n")
    s = Settings.from_env({"IDV_PROVIDER_API_KEY": "env-key", "IDV_PROVIDER_API_KEY_FILE": str(f)})
    assert s.provider_api_key == "file-key"
    assert "file-key" not in repr(s)


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({}, "IDV_PROVIDER_API_KEY: is required"),
        ({"IDV_PROVIDER_API_KEY": "k", "IDV_MAX_IN_FLIGHT": "many"}, "IDV_MAX_IN_FLIGHT: invalid value"),
        ({"IDV_PROVIDER_API_KEY": "k", "IDV_MAX_IN_FLIGHT": "0"}, "IDV_MAX_IN_FLIGHT"),
        ({"IDV_PROVIDER_API_KEY": "k", "IDV_LEASE_S": "5"}, "IDV_LEASE_S"),
        ({"IDV_PROVIDER_API_KEY": "k", "IDV_AUTO_OFFSET_RESET": "middle"}, "IDV_AUTO_OFFSET_RESET"),
        ({"IDV_PROVIDER_API_KEY_FILE": "/nonexistent/key"}, "IDV_PROVIDER_API_KEY_FILE: cannot read"),
        ({"IDV_PROVIDER_API_KEY": "k", "IDV_PROVIDER_URL": "ftp://x"}, "IDV_PROVIDER_URL"),
        ({"IDV_PROVIDER_API_KEY": "k", "IDV_MAX_BUFFERED": "64"}, "IDV_MAX_BUFFERED: must be at least"),
        ({"IDV_PROVIDER_API_KEY": "k", "IDV_EVENT_LOOP": "trio"}, "IDV_EVENT_LOOP"),
        ({"IDV_PROVIDER_API_KEY": "k", "IDV_PROVIDER_TRANSPORT": "curl"}, "IDV_PROVIDER_TRANSPORT"),
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
    s = Settings.from_env(
        {"IDV_CONFIG_FILE": str(cfg), "IDV_PROVIDER_API_KEY": "k", "IDV_MAX_IN_FLIGHT": "8"}
    )
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
        Settings.from_env({"IDV_CONFIG_FILE": str(cfg), "IDV_PROVIDER_API_KEY": "k"})


def test_event_loop_choice() -> None:
    from consumer.cli import event_loop_options

    assert event_loop_options("asyncio") == {}
    assert event_loop_options("auto") == {"use_uvloop": True}  # uvloop is a dependency on this platform
    assert event_loop_options("uvloop") == {"use_uvloop": True}
