"""Deterministic verification outcomes, chosen by tokens in the request body.

Tests steer the sandbox by what they send, not by server-side state: a string value anywhere in the
body (nested objects and arrays included, keys excluded) containing ``DECLINE`` gives ``Declined``,
otherwise one containing ``REVIEW`` gives ``In Review``, otherwise the outcome is ``Approved``.
Matching ignores case.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from enum import StrEnum

__all__ = ["Decision", "aml_details", "decide", "id_warnings"]

_DECLINE = re.compile("decline", re.IGNORECASE)
_REVIEW = re.compile("review", re.IGNORECASE)


class Decision(StrEnum):
    APPROVED = "Approved"
    DECLINED = "Declined"
    IN_REVIEW = "In Review"


def _strings(value: object) -> Iterator[str]:
    # Iterative walk: request bodies are parsed JSON, which may nest deeper than the recursion limit.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def decide(body: object) -> Decision:
    """Return the outcome for a parsed JSON request body."""
    review = False
    for text in _strings(body):
        if _DECLINE.search(text):
            return Decision.DECLINED
        if not review and _REVIEW.search(text):
            review = True
    return Decision.IN_REVIEW if review else Decision.APPROVED


_AML = {
    Decision.APPROVED: (0, 0.0),
    Decision.IN_REVIEW: (1, 0.55),
    Decision.DECLINED: (3, 0.97),
}

_WARNINGS: dict[Decision, list[dict[str, str]]] = {
    Decision.APPROVED: [],
    Decision.IN_REVIEW: [
        {
            "risk": "LOW_IMAGE_QUALITY",
            "log_type": "warning",
            "short_description": "Document image quality is low",
        }
    ],
    Decision.DECLINED: [
        {
            "risk": "DOCUMENT_TAMPERING_DETECTED",
            "log_type": "error",
            "short_description": "Signs of tampering on the document",
        }
    ],
}


def aml_details(decision: Decision) -> tuple[int, float]:
    """``(total_hits, score)`` of an AML screening with this outcome."""
    return _AML[decision]


def id_warnings(decision: Decision) -> list[dict[str, str]]:
    """Warnings an ID verification with this outcome reports (a fresh list each call)."""
    return [dict(w) for w in _WARNINGS[decision]]
