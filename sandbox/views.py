"""JSON views of the sandbox's records: one rule for turning a record's fields into an answer's dict."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

__all__ = ["pick"]

_SAME: Mapping[str, str] = {}


def pick(record: Any, *names: str, attrs: Mapping[str, str] = _SAME) -> dict[str, Any]:
    """``{name: record.<attr>}`` for each of ``names`` in order (every dataclass field when none are
    named), where ``attrs`` maps an answer's name to the attribute it shows, if they differ. Shallow:
    the values are the record's own."""
    wanted = names or tuple(f.name for f in dataclasses.fields(record))
    return {name: getattr(record, attrs.get(name, name)) for name in wanted}
