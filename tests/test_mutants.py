"""The mutation checks' definitions stay runnable (the runs themselves are ``make mutants``, not CI)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from tests import mutants


def test_every_mutant_applies_cleanly_to_the_current_code() -> None:
    assert mutants.check_all() == []


def test_names_are_unique_and_every_mutant_names_tests_that_exist() -> None:
    names = [m.name for m in mutants.MUTANTS]
    assert len(names) == len(set(names))
    for m in mutants.MUTANTS:
        assert m.tests, m.name
        for node in m.tests:
            path, _, test = node.partition("::")
            source = (mutants.ROOT / path).read_text()
            assert f"def {test.split('[')[0]}(" in source, f"{m.name}: {node} does not exist"


def test_a_snippet_that_drifted_fails_loudly(tmp_path: Path) -> None:
    m = replace(mutants.MUTANTS[0], old="this line is not in the file\n")
    (tmp_path / m.file).parent.mkdir(parents=True)
    (tmp_path / m.file).write_text((mutants.ROOT / m.file).read_text())
    with pytest.raises(mutants.MutantError, match=rf"mutant {m.name}: snippet not found in {m.file}; update"):
        mutants.apply(m, tmp_path)
