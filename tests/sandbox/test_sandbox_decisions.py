from __future__ import annotations

import pytest

from sandbox.decisions import Decision, aml_details, decide, id_warnings


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"full_name": "Ada Lovelace"}, Decision.APPROVED),
        ({}, Decision.APPROVED),
        ({"full_name": "Ada DECLINE"}, Decision.DECLINED),
        ({"full_name": "please decline me"}, Decision.DECLINED),
        ({"vendor_data": "user-REVIEW-1"}, Decision.IN_REVIEW),
        ({"vendor_data": "Review"}, Decision.IN_REVIEW),
        ({"a": "REVIEW", "b": "DECLINED"}, Decision.DECLINED),
        ({"a": "DECLINE", "b": "REVIEW"}, Decision.DECLINED),
        ({"meta": {"tags": ["x", {"deep": ["decline"]}]}}, Decision.DECLINED),
        ({"meta": [["review"]]}, Decision.IN_REVIEW),
    ],
)
def test_decide(body: object, expected: Decision) -> None:
    assert decide(body) is expected


def test_keys_and_non_strings_are_ignored() -> None:
    assert decide({"DECLINE": 1, "REVIEW": None, "n": 3.5, "ok": True}) is Decision.APPROVED


def test_top_level_string_and_list() -> None:
    assert decide("decline") is Decision.DECLINED
    assert decide(["fine", "review"]) is Decision.IN_REVIEW
    assert decide(None) is Decision.APPROVED


def test_deep_nesting_does_not_recurse() -> None:
    body: object = "REVIEW"
    for _ in range(10_000):
        body = [body]
    assert decide(body) is Decision.IN_REVIEW


def test_decision_values_match_the_provider_vocabulary() -> None:
    assert [d.value for d in Decision] == ["Approved", "Declined", "In Review"]


def test_details_are_ordered_by_risk() -> None:
    hits = [aml_details(d)[0] for d in (Decision.APPROVED, Decision.IN_REVIEW, Decision.DECLINED)]
    scores = [aml_details(d)[1] for d in (Decision.APPROVED, Decision.IN_REVIEW, Decision.DECLINED)]
    assert hits == sorted(hits)
    assert scores == sorted(scores)
    assert id_warnings(Decision.APPROVED) == []
    assert id_warnings(Decision.DECLINED)[0]["log_type"] == "error"


def test_warnings_are_fresh_copies() -> None:
    id_warnings(Decision.IN_REVIEW)[0]["risk"] = "changed"
    assert id_warnings(Decision.IN_REVIEW)[0]["risk"] == "LOW_IMAGE_QUALITY"
