"""The wire contract as files, for producers in any language (docs/contract.md).

Shipped as package data, so a Python user can load them without a checkout::

    from producer.contract import envelope_schema
    jsonschema.validate(candidate, envelope_schema())

* ``envelope.schema.json`` — JSON Schema (draft-07) of a request value, per operation;
* ``result.schema.json`` — JSON Schema of a result event;
* ``workflow-result.schema.json`` — JSON Schema of a ``kyc_workflow``'s decision event (and its revisions);
* ``asyncapi.yaml`` — AsyncAPI 3 document of the request, results and dead-letter topics (keys, headers).

:func:`producer.envelope.decode` stays the authority; the rules a JSON Schema cannot express (byte size,
UTF-8, JSON syntax, header agreement, ...) are listed in the envelope schema's description.
"""

from __future__ import annotations

import json
from importlib.resources import files
from importlib.resources.abc import Traversable
from typing import Any

__all__ = [
    "CONTRACT_FILES",
    "asyncapi_text",
    "contract_file",
    "envelope_schema",
    "result_schema",
    "workflow_result_schema",
]

CONTRACT_FILES = (
    "envelope.schema.json",
    "result.schema.json",
    "workflow-result.schema.json",
    "asyncapi.yaml",
)


def contract_file(name: str) -> Traversable:
    """One of :data:`CONTRACT_FILES` as an importlib resource."""
    if name not in CONTRACT_FILES:
        raise ValueError(f"unknown contract file {name!r}; one of {', '.join(CONTRACT_FILES)}")
    return files(__name__).joinpath(name)


def _json(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(contract_file(name).read_text(encoding="utf-8"))
    return data


def envelope_schema() -> dict[str, Any]:
    """The request envelope's JSON Schema, parsed."""
    return _json("envelope.schema.json")


def result_schema() -> dict[str, Any]:
    """The result event's JSON Schema, parsed."""
    return _json("result.schema.json")


def workflow_result_schema() -> dict[str, Any]:
    """The workflow decision event's JSON Schema, parsed."""
    return _json("workflow-result.schema.json")


def asyncapi_text() -> str:
    """The AsyncAPI document as YAML text (parse it with any YAML library)."""
    return contract_file("asyncapi.yaml").read_text(encoding="utf-8")
