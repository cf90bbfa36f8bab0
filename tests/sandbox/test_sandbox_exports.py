from __future__ import annotations

import importlib

import pytest

import sandbox

MODULES = [
    "app",
    "checks",
    "cli",
    "config",
    "decisions",
    "didit",
    "errors",
    "faults",
    "idempotency",
    "ledger",
    "messages",
    "multipart",
    "provider",
    "ratelimit",
    "responses",
    "server",
    "sessions",
    "testing",
    "thread",
]


def test_package_exports_exist_and_are_unique() -> None:
    assert len(sandbox.__all__) == len(set(sandbox.__all__))
    for name in sandbox.__all__:
        assert hasattr(sandbox, name), name


@pytest.mark.parametrize("module_name", MODULES)
def test_module_exports_exist(module_name: str) -> None:
    module = importlib.import_module(f"sandbox.{module_name}")
    for name in module.__all__:
        assert hasattr(module, name), f"sandbox.{module_name}.{name}"


def test_public_classes_belong_to_the_package() -> None:
    for name in sandbox.__all__:
        obj = getattr(sandbox, name)
        if isinstance(obj, type):
            assert obj.__module__.startswith("sandbox."), name
