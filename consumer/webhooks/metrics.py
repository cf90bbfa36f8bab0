"""Prometheus metrics of the webhook intake service, in a registry of their own (as consumer/metrics.py).

``idv_webhooks_received_total{result}``: every request to the webhook path, by outcome. The label values
are a fixed vocabulary (:data:`RESULTS`), every series exists from the start at 0, and nothing taken from a
request (event type, session) ever becomes a label.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.process_collector import ProcessCollector

from consumer.metrics import CONTENT_TYPE, _WithoutCreated
from consumer.webhooks.signature import REJECT_REASONS

__all__ = ["CONTENT_TYPE", "RESULTS", "WebhookMetrics"]

#: accepted: published and acknowledged (2xx); ignored: signed, but not a session event (2xx, nothing
#: published); the signature reasons (401); invalid_json, too_large, unsupported_media_type,
#: read_timeout (4xx);
#: not_durable: the broker did not acknowledge (503).
RESULTS = (
    "accepted",
    "ignored",
    *REJECT_REASONS,
    "invalid_json",
    "too_large",
    "unsupported_media_type",
    "read_timeout",
    "not_durable",
)

# Produce round trips: ~2-5 ms against a local broker with acks=all; the timeout is seconds.
PUBLISH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class WebhookMetrics:
    def __init__(self, *, process_metrics: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._exposed = _WithoutCreated(self.registry)
        if process_metrics:
            ProcessCollector(registry=self.registry)
        r = self.registry
        self._received = Counter(
            "idv_webhooks_received",
            "Requests to the webhook path, by result (accepted = acknowledged by Kafka, then 2xx).",
            ("result",),
            registry=r,
        )
        self._children = {result: self._received.labels(result) for result in RESULTS}
        self._publish = Histogram(
            "idv_webhook_publish_duration_seconds",
            "From send to the broker's acknowledgement of one accepted event (acks=all).",
            buckets=PUBLISH_BUCKETS,
            registry=r,
        )
        self._in_flight = Gauge("idv_webhooks_in_flight", "Webhook requests being handled now.", registry=r)
        self._previous_secret = Counter(
            "idv_webhooks_previous_secret",
            "Accepted deliveries signed with IDV_WEBHOOK_SECRET_PREVIOUS (a rotation not finished yet).",
            registry=r,
        )

    def received(self, result: str) -> None:
        """One request answered; ``result`` is one of :data:`RESULTS` (the callers' fixed vocabulary)."""
        self._children[result].inc()

    def published(self, seconds: float) -> None:
        self._publish.observe(seconds)

    def previous_secret(self) -> None:
        self._previous_secret.inc()

    def in_flight(self, delta: int) -> None:
        self._in_flight.inc(delta)

    def count(self, result: str) -> float:
        """The counter's value for one result (tests, status)."""
        value = self.registry.get_sample_value("idv_webhooks_received_total", {"result": result})
        return float(value or 0.0)

    def render(self) -> bytes:
        return generate_latest(self._exposed)
