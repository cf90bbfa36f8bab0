"""The replay and dead-letter tools: re-read a topic (or the dead-letter topic) through the daemon's pipeline.

Four things an operator does with it (CLI: ``idv-consumer replay`` and ``idv-consumer dlq``, guide:
docs/replay.md and docs/dead-letters.md):

* **replay** a range of the request topic — by partition and offsets, or by time — through
  :class:`consumer.pipeline.Processor` with the same dedupe store and provider client as the daemon.
  Completed keys are answered from the store and never sent again; ``emit_results`` re-publishes their
  result events.
* **redrive** dead letters: strip the ``idv-dlq-*`` headers and run the original message through the
  pipeline (``direct``) or write it back to its original topic (``republish``).
* **dry run**: classify every message against the store (new, completed, in progress, conflict, invalid…)
  with read-only calls (``store.get``) and without a provider client at all.
* **reverify**: run completed requests again on purpose, under a new key generation
  (``idempotency_key(..., generation=N)``), with an audit line written *before* each provider call.

Safety rules that hold in every mode:

* The live consumer group is never touched: partitions are ``assign()``-ed by hand, with no group or
  with the tool's own ``group`` (refused when it equals ``IDV_GROUP_ID``), so the daemon's committed
  offsets cannot move.
* Messages older than the dedupe retention are refused unless ``force``: their records may have been
  purged, and then only the provider's own key retention would stop a second side effect. The check is
  exact per partition: ``offsets_for_times(now - retention)`` returns the first offset whose timestamp is
  within retention, so every offset before it is older.
* Messages with the same Kafka key in the same partition are handled one after another in offset order
  (the daemon's lane rule); different keys run concurrently up to ``concurrency``.

Modules, one role each:

* :mod:`~consumer.tools.report` — the end-of-run report (counts, exit code), progress, time formatting
* :mod:`~consumer.tools.spans` — time arguments, offset/time span planning, the retention check, reading
* :mod:`~consumer.tools.runner` — the run's consumer and pipeline (via :mod:`consumer.wiring`), lanes, the
  signal guard, writing dead letters and results
* :mod:`~consumer.tools.replay` — replay and dry run (classification)
* :mod:`~consumer.tools.reverify` — ``--reverify`` and ``--retry-failed`` with their audit file
* :mod:`~consumer.tools.dlq` — dead-letter entries, ``dlq list``, ``dlq redrive`` (direct, republish)
* :mod:`~consumer.tools.show` — ``show <message-id>``: one request's records, conflicts, dead letters and
  results, read-only
"""

from __future__ import annotations
