"""Garbage-collector policy for the daemon's steady state.

Every message allocates a few hundred container objects (records, coroutines, futures, HTTP and Kafka
objects), so with CPython's default first-generation threshold (700) the collector ran ~800 times per
12,000 messages and took ~1 s of CPU, ~9 % of the daemon's time (measured with ``gc.callbacks`` in the
target cell of bench/throughput.py). A threshold of 10,000 cut that to 5 runs; at thousands of calls in
flight it was again far too low: every young collection found most of its objects still alive (a call
lives 0.5–2 s), moved them on, and traversed them again in the older generations. With 4,096 calls in
flight at 500 ms the collector took 7.6 s of a 25-s run (``gc.callbacks``, 282 young collections).
:func:`tune_gc` therefore sets 100,000 (4.2 s there, +29 % msg/s; at 20 ms with the adaptive defaults
0.72 s instead of 2.09) and freezes the start-up heap (modules, settings) so full collections do not
rescan it.

A high threshold alone lets cyclic garbage live longer, and some of it is large: a Kafka fetch response
(up to 1 MiB per partition) stays reachable from a reference cycle after its records are dispatched. So
the daemon also runs :func:`collect_young` about once a second, which frees such cycles within a second
whatever the allocation count (without it, peak RSS grew with the backlog: 240 MiB after 40,000
messages instead of ~75).
"""

from __future__ import annotations

import gc

import anyio

__all__ = ["collect_young", "collect_young_forever", "tune_gc"]

FIRST_GENERATION_THRESHOLD = 100_000


def tune_gc() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(FIRST_GENERATION_THRESHOLD, 10, 10)


def collect_young() -> int:
    """Collect the two younger generations (what lives there: at most ~100,000 objects each)."""
    return gc.collect(1)


async def collect_young_forever(interval_s: float = 1.0) -> None:
    """Run :func:`collect_young` every ``interval_s``: cyclic garbage holding fetch buffers is freed
    within a second (the daemon runs this in its task group)."""
    while True:
        await anyio.sleep(interval_s)
        collect_young()
