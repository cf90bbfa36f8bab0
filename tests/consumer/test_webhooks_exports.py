"""``consumer.webhooks``' public API: everything in ``__all__`` exists, and each module's is re-exported."""

from __future__ import annotations

import importlib

import pytest

import consumer.webhooks as webhooks

MODULES = [
    "consumer.webhooks.app",
    "consumer.webhooks.metrics",
    "consumer.webhooks.publisher",
    "consumer.webhooks.service",
    "consumer.webhooks.settings",
    "consumer.webhooks.signature",
]
# Lower-level names that stay in their module on purpose (header names, defaults, the reason vocabulary).
NOT_REEXPORTED = {
    "CONTENT_TYPE",
    "DEFAULT_PATH",
    "DEFAULT_PORT",
    "DEFAULT_WINDOW_S",
    "HEADER_RAW",
    "HEADER_SIMPLE",
    "HEADER_TIMESTAMP",
    "HEADER_V2",
    "REJECT_REASONS",
}


def test_all_names_exist_without_duplicates() -> None:
    for name in webhooks.__all__:
        assert hasattr(webhooks, name), name
    assert len(set(webhooks.__all__)) == len(webhooks.__all__)


@pytest.mark.parametrize("module_name", MODULES)
def test_module_api_is_reexported(module_name: str) -> None:
    module = importlib.import_module(module_name)
    for name in set(module.__all__) - NOT_REEXPORTED:
        assert name in webhooks.__all__, f"{module_name}.{name} is not re-exported"
        assert getattr(webhooks, name) is getattr(module, name)


def test_the_entry_point_is_declared() -> None:
    import tomllib

    from tests.conftest import ROOT

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["idv-webhooks"] == "consumer.webhooks.cli:main"
