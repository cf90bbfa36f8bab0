"""Every test the documentation cites exists under that name.

The docs cite tests in backticks, as a file (`tests/consumer/test_bad_input.py`), a test
(`test_crash_with_many_in_flight`), a test in a file (`tests/x.py::test_y`) or one parameter of it
(`test_partition_moving_mid_call_is_not_repeated_at_the_provider[drained]`). A renamed or deleted test
leaves a sentence claiming a guarantee is tested when it is not: this fails instead.
"""

from __future__ import annotations

import re

import pytest

from tests.conftest import ROOT

DOCS = sorted([*(ROOT / "docs").glob("*.md"), ROOT / "README.md"])
REFERENCE = re.compile(r"`(?P<file>tests/[\w/]+\.py)?(?:::)?(?P<test>test_\w+)?(?:\[(?P<param>[^\]`]*)\])?`")
TESTS = {p: p.read_text() for p in (ROOT / "tests").rglob("test_*.py")}


def references() -> list[tuple[str, str | None, str | None, str | None]]:
    out = []
    for doc in DOCS:
        for lineno, line in enumerate(doc.read_text().splitlines(), 1):
            out.extend(
                (f"{doc.name}:{lineno}", m["file"], m["test"], m["param"])
                for m in REFERENCE.finditer(line)
                if m["file"] or m["test"]
            )
    return out


def _defines(source: str, test: str) -> bool:
    return re.search(rf"^(?:async )?def {test}\(", source, re.MULTILINE) is not None


def test_the_docs_cite_tests_at_all() -> None:
    # If the pattern stopped matching, every reference would pass vacuously.
    assert len(references()) >= 20


@pytest.mark.parametrize(("where", "file", "test", "param"), references(), ids=lambda v: str(v))
def test_cited_test_exists(where: str, file: str | None, test: str | None, param: str | None) -> None:
    if file is not None:
        path = ROOT / file
        assert path.is_file(), f"{where}: {file} does not exist"
        candidates = {path: TESTS.get(path, path.read_text())}
    else:
        candidates = TESTS
    if test is None:
        return
    defining = [p for p, src in candidates.items() if _defines(src, test)]
    assert defining, f"{where}: no test named {test}" + (f" in {file}" if file else "")
    if param and param not in ("...", "…"):
        # A parameter id joins the values with "-" (`after_provider_call-40`): each must be in the file.
        parts = [part for part in param.split("-") if part]
        assert any(
            all(re.search(rf"\b{re.escape(part)}\b", candidates[p]) for part in parts) for p in defining
        ), f"{where}: {test} has no parameter {param!r}"


def test_every_crash_window_in_guarantees_is_a_parameter_of_the_crash_window_test() -> None:
    from consumer.faults import POINTS
    from tests.consumer.test_exactly_once import test_crash_window_then_restart

    text = (ROOT / "docs" / "guarantees.md").read_text()
    section = text.split("## Crash windows", 1)[1].split("Other failures", 1)[0]
    windows = re.findall(r"^\| \*\*[^|]*\*\* \(`(\w+)`", section, re.MULTILINE)
    assert windows, "no crash-window rows found in docs/guarantees.md"
    (mark,) = [m for m in test_crash_window_then_restart.pytestmark if m.name == "parametrize"]
    params = {point for point, _ in mark.args[1]}
    assert set(windows) <= set(POINTS)
    assert set(windows) == params, f"documented {sorted(windows)}, tested {sorted(params)}"
