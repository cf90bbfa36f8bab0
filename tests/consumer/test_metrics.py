from __future__ import annotations

import enum

import pytest
from prometheus_client.parser import text_string_to_metric_families

from consumer.metrics import METRIC_NAMES, PROVIDER_LATENCY_BUCKETS, Metrics


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the rendered text, keyed by (name, sorted labels); parsing proves the format."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return samples(m).get((name, tuple(sorted(labels.items()))))


def test_consumed_counts_per_topic_and_partition() -> None:
    m = Metrics()
    m.consumed("idv.requests", 0)
    m.consumed("idv.requests", 0)
    m.consumed("idv.requests", 7)
    assert value(m, "idv_messages_consumed_total", topic="idv.requests", partition="0") == 2
    assert value(m, "idv_messages_consumed_total", topic="idv.requests", partition="7") == 1


def test_finished_by_disposition_and_status() -> None:
    class Disposition(enum.Enum):  # the shape of consumer.pipeline.Disposition
        DUPLICATE = "duplicate"

    m = Metrics()
    m.finished("completed", "approved")
    m.finished("completed", "approved")
    m.finished("failed", "failed")
    m.finished(Disposition.DUPLICATE)
    m.finished("dead_lettered")
    assert value(m, "idv_messages_finished_total", disposition="completed", status="approved") == 2
    assert value(m, "idv_messages_finished_total", disposition="failed", status="failed") == 1
    assert value(m, "idv_messages_finished_total", disposition="duplicate", status="none") == 1
    assert value(m, "idv_messages_finished_total", disposition="dead_lettered", status="none") == 1


def test_unexpected_label_values_collapse_into_other_instead_of_growing_series() -> None:
    m = Metrics()
    m.finished("surprise-1", "maybe")
    m.finished("surprise-2", "perhaps")
    finished = {k: v for k, v in samples(m).items() if k[0] == "idv_messages_finished_total"}
    assert finished == {("idv_messages_finished_total", (("disposition", "other"), ("status", "other"))): 2.0}


def test_reconciliations_by_result_from_zero_and_unknown_results_as_other() -> None:
    m = Metrics()
    for result in ("found", "not_found", "in_doubt"):  # every series exists before the first lookup
        assert value(m, "idv_reconciliations_total", result=result) == 0
    m.reconciliation("found")
    m.reconciliation("found")
    m.reconciliation("in_doubt")
    for n in range(50):
        m.reconciliation(f"surprise-{n}")
    counted = {k[1]: v for k, v in samples(m).items() if k[0] == "idv_reconciliations_total"}
    assert counted == {
        (("result", "found"),): 2.0,
        (("result", "not_found"),): 0.0,
        (("result", "in_doubt"),): 1.0,
        (("result", "other"),): 50.0,
    }
    # The cached children are keyed by the counted label: fifty unknown results are one child, not fifty.
    assert sorted(m._reconciliation_children._children) == ["found", "in_doubt", "not_found", "other"]


def test_dead_letters_by_reason() -> None:
    m = Metrics()
    m.dead_letter("too_large")
    m.dead_letter("retries_exhausted")
    m.dead_letter("too_large")
    assert value(m, "idv_dead_letters_total", reason="too_large") == 2
    assert value(m, "idv_dead_letters_total", reason="retries_exhausted") == 1


def test_provider_calls_by_status_with_latency_histogram() -> None:
    m = Metrics()
    m.provider_call(200, 0.004)
    m.provider_call(200, 0.3)
    m.provider_call(503, 1.5)
    m.provider_call(None, 12.0)
    m.provider_retry()
    m.provider_retry()
    assert value(m, "idv_provider_calls_total", status="200") == 2
    assert value(m, "idv_provider_calls_total", status="503") == 1
    assert value(m, "idv_provider_calls_total", status="transport_error") == 1
    assert value(m, "idv_provider_retries_total") == 2
    assert value(m, "idv_provider_call_duration_seconds_count") == 4
    assert value(m, "idv_provider_call_duration_seconds_sum") == pytest.approx(13.804)
    assert value(m, "idv_provider_call_duration_seconds_bucket", le="0.005") == 1
    assert value(m, "idv_provider_call_duration_seconds_bucket", le="0.5") == 2
    assert value(m, "idv_provider_call_duration_seconds_bucket", le="2.5") == 3
    assert value(m, "idv_provider_call_duration_seconds_bucket", le="20.0") == 4
    assert PROVIDER_LATENCY_BUCKETS[0] == 0.005
    assert PROVIDER_LATENCY_BUCKETS[-1] == 30.0


def test_gauges_in_flight_offsets_lag_and_forgetting_a_revoked_partition() -> None:
    m = Metrics()
    m.set_in_flight(17)
    m.committed("t", 3, 1200)
    m.lag("t", 3, 45)
    m.committed("t", 4, 10)
    m.lag("t", 4, 0)
    assert value(m, "idv_messages_in_flight") == 17
    assert value(m, "idv_committed_offset", topic="t", partition="3") == 1200
    assert value(m, "idv_consumer_lag", topic="t", partition="3") == 45
    m.forget_partition("t", 3)
    m.forget_partition("t", 99)  # never seen: nothing to do
    s = samples(m)
    assert ("idv_committed_offset", (("partition", "3"), ("topic", "t"))) not in s
    assert ("idv_consumer_lag", (("partition", "3"), ("topic", "t"))) not in s
    assert value(m, "idv_committed_offset", topic="t", partition="4") == 10
    m.committed("t", 3, 1300)  # assigned again later: reported again
    assert value(m, "idv_committed_offset", topic="t", partition="3") == 1300


def test_store_op_plain_call_and_timer_which_also_observes_failures() -> None:
    m = Metrics()
    m.store_op("claim", 0.002)
    with m.time_store("complete"):
        pass
    with pytest.raises(RuntimeError), m.time_store("complete"):
        raise RuntimeError("store down")
    assert value(m, "idv_store_operation_duration_seconds_count", op="claim") == 1
    assert value(m, "idv_store_operation_duration_seconds_bucket", op="claim", le="0.0025") == 1
    assert value(m, "idv_store_operation_duration_seconds_bucket", op="claim", le="0.001") == 0
    assert value(m, "idv_store_operation_duration_seconds_count", op="complete") == 2


def test_circuit_state_accepts_names_numbers_and_int_enums() -> None:
    class BreakerState(enum.IntEnum):  # the shape of consumer.breaker.BreakerState
        CLOSED = 0
        HALF_OPEN = 1
        OPEN = 2

    m = Metrics()
    assert value(m, "idv_circuit_breaker_state") == 0
    m.circuit(BreakerState.OPEN)
    assert value(m, "idv_circuit_breaker_state") == 2
    m.circuit("half-open")
    assert value(m, "idv_circuit_breaker_state") == 1
    m.circuit("closed")
    assert value(m, "idv_circuit_breaker_state") == 0
    with pytest.raises(ValueError, match="circuit state"):
        m.circuit(5)
    with pytest.raises(KeyError):
        m.circuit("ajar")


def test_each_instance_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()  # would raise "Duplicated timeseries" on a shared registry
    a.consumed("t", 0)
    assert value(a, "idv_messages_consumed_total", topic="t", partition="0") == 1
    assert value(b, "idv_messages_consumed_total", topic="t", partition="0") is None


def test_render_lists_every_documented_metric_with_help_and_type() -> None:
    m = Metrics()
    text = m.render().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in METRIC_NAMES:
        base = name.removesuffix("_total")
        assert base in families, name
        assert families[base].documentation, name
    assert families["idv_provider_call_duration_seconds"].type == "histogram"
    assert families["idv_messages_in_flight"].type == "gauge"
    assert families["idv_messages_consumed"].type == "counter"
    # Process metrics come along; the per-child *_created timestamps do not.
    assert "process_cpu_seconds" in families
    m.consumed("t", 0)
    assert "_created" not in m.render().decode()


def test_process_metrics_can_be_left_out() -> None:
    assert "process_" not in Metrics(process_metrics=False).render().decode()


def test_documented_in_operations_page() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    missing = [name for name in METRIC_NAMES if name not in doc]
    assert not missing, f"metrics missing from docs/operations.md: {missing}"


def test_in_doubt_dead_letters_are_also_counted_on_their_own() -> None:
    m = Metrics()
    m.dead_letter("retries_exhausted")
    m.dead_letter("in_doubt")
    m.dead_letter("in_doubt")
    assert value(m, "idv_in_doubt_total") == 2
    assert value(m, "idv_dead_letters_total", reason="in_doubt") == 2
    m.finished("in_doubt")
    assert value(m, "idv_messages_finished_total", disposition="in_doubt", status="none") == 1
