"""Sample envelopes: deterministic, valid, synthetic, with controlled duplicates and decision tokens."""

from __future__ import annotations

import re
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from producer.envelope import OPERATIONS, Envelope, decode, encode
from producer.samples import SAMPLE_OPERATIONS, iter_sample_envelopes, sample_envelopes

# The sandbox's rule: any request string containing these (ignoring case) steers the decision.
DECLINE = re.compile("decline", re.IGNORECASE)
REVIEW = re.compile("review", re.IGNORECASE)


def strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def decision(envelope: Envelope) -> str:
    texts = list(strings(envelope.request))
    if any(DECLINE.search(t) for t in texts):
        return "Declined"
    if any(REVIEW.search(t) for t in texts):
        return "In Review"
    return "Approved"


def test_same_arguments_give_the_same_envelopes() -> None:
    first = sample_envelopes(500, seed=7, duplicate_ratio=0.2)
    second = sample_envelopes(500, seed=7, duplicate_ratio=0.2)
    assert [encode(e) for e in first] == [encode(e) for e in second]


def test_a_different_seed_gives_different_ids() -> None:
    a = {e.message_id for e in sample_envelopes(100, seed=1)}
    b = {e.message_id for e in sample_envelopes(100, seed=2)}
    assert not a & b


def test_every_envelope_is_valid_on_the_wire() -> None:
    for envelope in sample_envelopes(600, seed=3, duplicate_ratio=0.1):
        assert decode(encode(envelope), envelope.headers()) == envelope


def test_covers_the_three_operations_evenly() -> None:
    assert set(SAMPLE_OPERATIONS) <= set(OPERATIONS)
    counts = Counter(e.operation for e in sample_envelopes(300))
    assert counts == dict.fromkeys(SAMPLE_OPERATIONS, 100)


def test_message_ids_are_time_ordered_uuid7() -> None:
    envelopes = sample_envelopes(200, seed=4)
    parsed = [uuid.UUID(e.message_id) for e in envelopes]
    assert all(p.version == 7 for p in parsed)
    assert [p.int for p in parsed] == sorted(p.int for p in parsed)


def test_subjects_repeat_so_partitions_see_ordered_runs() -> None:
    subjects = Counter(e.subject_id for e in sample_envelopes(400))
    assert max(subjects.values()) > 1
    assert all(s.startswith("synthetic-subject-") for s in subjects)


@pytest.mark.parametrize(
    ("count", "ratio", "expected"), [(1000, 0.1, 100), (10, 0.25, 2), (1, 0.5, 0), (0, 0.5, 0)]
)
def test_duplicate_ratio_repeats_earlier_envelopes_unchanged(count: int, ratio: float, expected: int) -> None:
    envelopes = sample_envelopes(count, seed=5, duplicate_ratio=ratio)
    assert len(envelopes) == count
    first_seen: dict[str, bytes] = {}
    repeats = 0
    for envelope in envelopes:
        value = encode(envelope)
        if envelope.message_id in first_seen:
            repeats += 1
            assert value == first_seen[envelope.message_id]  # same ID, identical payload
        else:
            first_seen[envelope.message_id] = value
    assert repeats == expected


def test_no_duplicates_by_default() -> None:
    envelopes = sample_envelopes(1000)
    assert len({e.message_id for e in envelopes}) == 1000


def test_decision_mix_puts_tokens_in_vendor_data_only() -> None:
    envelopes = sample_envelopes(3000, seed=11)
    decisions = Counter(decision(e) for e in envelopes)
    assert 200 <= decisions["Declined"] <= 400
    assert 200 <= decisions["In Review"] <= 400
    for envelope in envelopes:
        for name, value in envelope.request.items():
            if name != "vendor_data":
                assert not any(DECLINE.search(t) or REVIEW.search(t) for t in strings(value)), name


def test_without_decision_mix_every_request_is_approved() -> None:
    envelopes = sample_envelopes(3000, seed=11, decision_mix=False)
    assert {decision(e) for e in envelopes} == {"Approved"}


def test_personal_data_is_obviously_synthetic() -> None:
    for envelope in sample_envelopes(300, seed=12):
        request = envelope.request
        if envelope.operation == "aml_screening":
            assert request["full_name"].startswith("Sample Person ")
            assert request["document_number"].startswith("TEST")
            assert request["nationality"] == "ZZ"
        elif envelope.operation == "id_verification":
            assert request["front_image"].startswith("synthetic-")
        else:
            assert ".invalid/" in request["callback"]


def test_start_moves_created_at_but_keeps_ids_and_requests() -> None:
    start = datetime(2030, 5, 1, 12, 0, tzinfo=UTC)
    default = sample_envelopes(50, seed=9)
    later = sample_envelopes(50, seed=9, start=start)
    assert [e.message_id for e in later] == [e.message_id for e in default]
    assert [e.request for e in later] == [e.request for e in default]
    assert later[0].created_at == "2030-05-01T12:00:00.000Z"
    assert later[1].created_at == "2030-05-01T12:00:00.001Z"
    assert default[0].created_at == "2026-01-01T00:00:00.000Z"


def test_iterator_and_list_agree() -> None:
    assert list(iter_sample_envelopes(100, seed=2, duplicate_ratio=0.3)) == sample_envelopes(
        100, seed=2, duplicate_ratio=0.3
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"count": -1}, "count must not be negative"),
        ({"count": 10, "duplicate_ratio": 1.0}, r"duplicate_ratio must be in \[0, 1\)"),
        ({"count": 10, "duplicate_ratio": -0.1}, r"duplicate_ratio must be in \[0, 1\)"),
        ({"count": 10, "start": datetime(2030, 1, 1)}, "start must carry a UTC offset"),  # noqa: DTZ001
    ],
)
def test_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sample_envelopes(**kwargs)  # type: ignore[arg-type]
