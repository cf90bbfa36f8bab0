"""Exit codes of ``idv-consumer`` (daemon, status, purge, replay, dlq): the one place they are defined.

==== ========================= =================================================================
code name                      meaning
==== ========================= =================================================================
0    ``EXIT_OK``               ``run``: stopped cleanly (SIGTERM/SIGINT, drained, committed);
                               tools: every message in range handled
1    ``EXIT_INCOMPLETE``       tools: some messages were not handled (set aside, dead-lettered
                               again, internal error, interrupted, not reached)
2    ``EXIT_CONFIG``           invalid settings or arguments; tools: refused (``EXIT_REFUSED`` is
                               the tools' name for the same code), Kafka or the store unreachable
3    ``EXIT_PROVIDER_AUTH``    the provider rejected the API key (401/403) or the endpoint is
                               wrong (:class:`~consumer.errors.ProviderConfigError`)
4    ``EXIT_BROKER``           ``run``: Kafka unreachable or refusing the connection settings
5    ``EXIT_STORE``            ``run``: the dedupe store cannot be opened at start-up
6    ``EXIT_TOPIC_MISSING``    ``run``: a request, dead-letter or results topic does not exist
==== ========================= =================================================================

The :class:`~consumer.errors.ConfigurationError` family carries its code as ``exit_code``, taken from
here. ``idv-publish`` (:mod:`producer.cli`) has its own, smaller table: the producer package does not
import the consumer.
"""

from __future__ import annotations

__all__ = [
    "EXIT_BROKER",
    "EXIT_CONFIG",
    "EXIT_INCOMPLETE",
    "EXIT_OK",
    "EXIT_PROVIDER_AUTH",
    "EXIT_REFUSED",
    "EXIT_STORE",
    "EXIT_TOPIC_MISSING",
]

EXIT_OK = 0
EXIT_INCOMPLETE = 1
EXIT_CONFIG = 2
EXIT_REFUSED = EXIT_CONFIG
EXIT_PROVIDER_AUTH = 3
EXIT_BROKER = 4
EXIT_STORE = 5
EXIT_TOPIC_MISSING = 6
