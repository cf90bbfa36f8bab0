"""Webhook intake (``idv-webhooks``): verifies Didit's signed deliveries and publishes each accepted one to
the events topic, answering 2xx only after Kafka acknowledged it. One module per step of a delivery:
``signature`` (is it Didit's, is it fresh) → ``app`` (HTTP checks and answers) → ``publisher`` (the
idempotent producer); ``service`` runs and stops them, ``settings`` and ``metrics`` serve all. See
docs/webhooks.md."""

from __future__ import annotations

from consumer.webhooks.app import Intake
from consumer.webhooks.metrics import RESULTS, WebhookMetrics
from consumer.webhooks.publisher import EventNotDurable, EventPublisher, event_headers
from consumer.webhooks.service import WebhookService, run
from consumer.webhooks.settings import DEFAULT_EVENTS_TOPIC, WebhookSettings
from consumer.webhooks.signature import (
    SignatureRejected,
    Verified,
    WebhookVerifier,
    canonical_v2,
    sign_raw,
    sign_simple,
    sign_v2,
)

__all__ = [
    "DEFAULT_EVENTS_TOPIC",
    "RESULTS",
    "EventNotDurable",
    "EventPublisher",
    "Intake",
    "SignatureRejected",
    "Verified",
    "WebhookMetrics",
    "WebhookService",
    "WebhookSettings",
    "WebhookVerifier",
    "canonical_v2",
    "event_headers",
    "run",
    "sign_raw",
    "sign_simple",
    "sign_v2",
]
