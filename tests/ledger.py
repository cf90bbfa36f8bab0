"""The one strict exactly-once check of the sandbox ledger, used by every end-to-end test.

"Exactly once" is judged on the provider's *whole* ledger, not only on the keys a test expects:

* the set of keys that received any request is exactly the expected set (plus keys the test names as
  allowed, e.g. dead-lettered ones): a take-over that re-sent under a *new* key, or a retry with a fresh key,
  shows up as an unknown key even when every expected key has its one side effect;
* every expected key has exactly one side effect (``at_most_once`` keys: zero or one);
* every attempt under a key beyond the one that acted is explained: answered from the provider's stored
  response (a replay), refused as in flight (409), refused before the idempotency layer (401/403/429), or
  an injected fault that did nothing.

The store half (every expected record COMPLETED) is in :func:`assert_exactly_once`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from consumer.keys import idempotency_key
from consumer.store import State, open_store
from producer.envelope import Envelope

__all__ = ["LedgerView", "assert_exactly_once", "assert_ledger_exactly_once", "keys_of"]

# Attempts that did not act and need no other explanation: refused before the idempotency layer
# (authentication, rate limit), or refused by it while the first request was in flight.
_HARMLESS_STATUSES = {401, 403, 409, 429}


def keys_of(envelopes: Iterable[Envelope], namespace: str = "idv") -> set[str]:
    return {idempotency_key(namespace, e.operation, e.message_id) for e in envelopes}


@dataclass
class LedgerView:
    """What the check saw, for tests that assert more (e.g. that a crash window's retry was a replay)."""

    side_effects: dict[str, int]
    replays: dict[str, int] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)


def assert_ledger_exactly_once(
    ledger: dict[str, Any],
    expected: set[str],
    *,
    at_most_once: Iterable[str] = (),
) -> LedgerView:
    """Check the sandbox ledger snapshot (``GET /_admin/ledger``) against the keys that must have acted.

    ``expected``: exactly one side effect each. ``at_most_once``: keys that may have acted once or not at
    all (dead-lettered after retries, FAILED). Any other key in the ledger fails the check.
    """
    keys: dict[str, Any] = ledger["keys"]
    maybe = set(at_most_once)
    allowed = expected | maybe
    unknown = {k: v["side_effects"] for k, v in keys.items() if k not in allowed}
    assert not unknown, (
        f"{len(unknown)} key(s) the test did not expect reached the provider (a new key on a retry or "
        f"take-over?): {list(unknown.items())[:5]}"
    )
    missing = expected - keys.keys()
    assert not missing, f"{len(missing)} message IDs never reached the provider, e.g. {sorted(missing)[:3]}"
    view = LedgerView(side_effects={k: int(v["side_effects"]) for k, v in keys.items()})
    wrong = {k: n for k, n in view.side_effects.items() if (n != 1 if k in expected else n > 1)}
    assert not wrong, f"keys with a wrong side-effect count: {list(wrong.items())[:5]}"
    unexplained: list[tuple[str, dict[str, Any]]] = []
    for k, v in keys.items():
        attempts = v["attempts"]
        view.attempts[k] = len(attempts)
        view.replays[k] = sum(1 for a in attempts if a["replayed"])
        if k in maybe:  # FAILED (422) or set aside: any answer is possible, the count above is the rule
            continue
        for a in attempts:
            if a["side_effect"] or a["replayed"] or a["fault"] is not None:
                continue
            if a["status"] in _HARMLESS_STATUSES or (a["status"] is not None and a["status"] >= 500):
                continue
            unexplained.append((k, a))
    assert not unexplained, f"attempts that neither acted nor were replays/409s/faults: {unexplained[:3]}"
    return view


async def assert_exactly_once(
    sandbox: Any,
    store_url: str,
    unique: list[Envelope],
    *,
    at_most_once: Iterable[Envelope] = (),
    namespace: str = "idv",
) -> LedgerView:
    """Strict ledger check (above) plus: every message of ``unique`` has a COMPLETED record."""
    view = assert_ledger_exactly_once(
        sandbox.ledger(), keys_of(unique, namespace), at_most_once=keys_of(at_most_once, namespace)
    )
    async with open_store(store_url) as store:
        for env in unique:
            record = await store.get(idempotency_key(namespace, env.operation, env.message_id))
            assert record is not None, env.message_id
            assert record.state is State.COMPLETED, (env.message_id, record.state)
    return view
