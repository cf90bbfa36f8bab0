"""The package's public API: everything in ``__all__`` exists, and each module's API is re-exported."""

from __future__ import annotations

import importlib

import pytest

import producer

MODULES = ["producer.envelope", "producer.errors", "producer.ids", "producer.publisher", "producer.samples"]
# Lower-level names that stay in their module on purpose.
NOT_REEXPORTED = {
    "DEFAULT_BOOTSTRAP",
    "DEFAULT_TOPIC",
    "DECLINE_TOKEN",
    "REVIEW_TOKEN",
    "SAMPLE_OPERATIONS",
    "iter_sample_envelopes",
}


def test_all_names_exist_without_duplicates() -> None:
    for name in producer.__all__:
        assert hasattr(producer, name), name
    assert len(set(producer.__all__)) == len(producer.__all__)


@pytest.mark.parametrize("module_name", MODULES)
def test_module_api_is_reexported(module_name: str) -> None:
    module = importlib.import_module(module_name)
    public = set(getattr(module, "__all__", ())) or {
        name
        for name, obj in vars(module).items()
        if isinstance(obj, type) and obj.__module__ == module_name and not name.startswith("_")
    }
    for name in public - NOT_REEXPORTED:
        assert name in producer.__all__, f"{module_name}.{name} is not re-exported"
        assert getattr(producer, name) is getattr(module, name)


def test_cli_entry_point_is_a_click_group() -> None:
    from producer.cli import main

    assert set(main.commands) == {"one", "file", "samples"}
