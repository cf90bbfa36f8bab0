"""Flow control without a broker: lanes keep one key in offset order, slots bound the buffer, a partition
over its share is held (paused, rest of the batch handed back) and resumed at half its share."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import anyio
import pytest
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from consumer.flow import Flow, Item

pytestmark = pytest.mark.anyio

T0 = TopicPartition("t", 0)
T1 = TopicPartition("t", 1)


class FakeConsumer:
    def __init__(self, *tps: TopicPartition) -> None:
        self.tps = set(tps)
        self.paused: set[TopicPartition] = set()
        self.seeks: list[tuple[TopicPartition, int]] = []

    def pause(self, *partitions: TopicPartition) -> None:
        self.paused.update(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self.paused.difference_update(partitions)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.seeks.append((partition, offset))

    def assignment(self) -> set[TopicPartition]:
        return set(self.tps)


def rec(tp: TopicPartition, offset: int, key: bytes | None) -> ConsumerRecord:
    return ConsumerRecord(tp.topic, tp.partition, offset, 0, 0, key, b"v", None, 1, 1, ())


FlowFactory = Callable[..., tuple[Flow, FakeConsumer]]


@pytest.fixture
def flow_with() -> Iterator[FlowFactory]:
    """``flow_with(max_buffered, *tps)``: an open Flow over a fake consumer; closed after the test."""
    made: list[Flow] = []

    def make(max_buffered: int, *tps: TopicPartition) -> tuple[Flow, FakeConsumer]:
        flow = Flow(max_buffered)
        flow.open()
        made.append(flow)
        consumer = FakeConsumer(*tps)
        flow.consumer = consumer
        flow.assign(tps)
        return flow, consumer

    yield make
    for flow in made:
        flow.close()


def ready_now(flow: Flow) -> list[Item]:
    out = []
    while True:
        try:
            out.append(flow.ready.receive_nowait())
        except anyio.WouldBlock:
            return out


async def test_same_key_runs_in_offset_order_other_keys_concurrently(flow_with: FlowFactory) -> None:
    flow, _ = flow_with(16, T0)
    await flow.dispatch_batch({T0: [rec(T0, 0, b"a"), rec(T0, 1, b"a"), rec(T0, 2, b"b"), rec(T0, 3, None)]})
    heads = ready_now(flow)
    assert [m.offset for _, _, m in heads] == [0, 2, 3]  # offset 1 waits behind 0 (same key)
    assert flow.in_flight() == 4
    part, lane, first = heads[0]
    flow.finish(part, lane)
    assert [m.offset for _, _, m in ready_now(flow)] == [1]
    for part, lane, _ in heads[1:]:
        flow.finish(part, lane)
    assert flow.in_flight() == 1 and part.active == 1


async def test_already_dispatched_offsets_are_not_dispatched_again(flow_with: FlowFactory) -> None:
    flow, _ = flow_with(16, T0)
    await flow.dispatch_batch({T0: [rec(T0, 0, b"a"), rec(T0, 1, b"b")]})
    await flow.dispatch_batch({T0: [rec(T0, 1, b"b"), rec(T0, 2, b"c")]})
    assert [m.offset for _, _, m in ready_now(flow)] == [0, 1, 2]


async def test_revoked_partition_gets_no_slots(flow_with: FlowFactory) -> None:
    flow, _ = flow_with(16, T0)
    flow.revoke([T0])
    await flow.dispatch_batch({T0: [rec(T0, 0, b"a")]})
    assert ready_now(flow) == [] and flow.free == 16


async def test_partition_over_its_share_is_held_and_resumed_at_half_its_share(flow_with: FlowFactory) -> None:
    flow, consumer = flow_with(8, T0, T1)  # share = 8 // 2 = 4
    await flow.dispatch_batch({T1: [rec(T1, 0, b"x"), rec(T1, 1, b"y")]})
    ready_now(flow)  # T1's two messages run (and keep their slots)
    # One key: everything queues behind offset 0.
    await flow.dispatch_batch({T0: [rec(T0, i, b"a") for i in range(8)]})
    part = flow.partitions[T0]
    assert part.active == 4 and part.held  # the 5th would be over its share, with the buffer past half
    assert consumer.seeks == [(T0, 4)] and T0 in consumer.paused  # rest handed back, not skipped
    assert T1 not in consumer.paused
    (head,) = ready_now(flow)
    flow.finish(head[0], head[1])  # active 3 > share // 2: still held
    assert part.held and T0 in consumer.paused
    (nxt,) = ready_now(flow)
    flow.finish(nxt[0], nxt[1])  # active 2 == share // 2: resumed
    assert not part.held and T0 not in consumer.paused


async def test_pause_all_and_resume_all_keep_held_partitions_paused(flow_with: FlowFactory) -> None:
    flow, consumer = flow_with(8, T0, T1)
    flow.partitions[T0].held = True
    consumer.pause(T0)
    flow.pause_all()
    assert consumer.paused == {T0, T1} and flow.all_paused
    flow.resume_all()
    assert consumer.paused == {T0} and not flow.all_paused


async def test_a_full_buffer_makes_dispatch_wait_for_a_slot(flow_with: FlowFactory) -> None:
    flow, _ = flow_with(2, T0)
    await flow.dispatch_batch({T0: [rec(T0, 0, b"a"), rec(T0, 1, b"b")]})
    assert flow.free == 0
    heads = ready_now(flow)
    async with anyio.create_task_group() as tg:
        tg.start_soon(flow.dispatch_batch, {T0: [rec(T0, 2, b"c")]})
        await anyio.sleep(0.01)
        assert flow.partitions[T0].offsets.last_seen == 1  # waiting for a slot
        flow.finish(heads[0][0], heads[0][1])
    assert [m.offset for _, _, m in ready_now(flow)] == [2]


async def test_cancel_inflight_counts_running_calls(flow_with: FlowFactory) -> None:
    flow, _ = flow_with(4, T0, T1)
    scopes = [anyio.CancelScope(), anyio.CancelScope()]
    flow.partitions[T0].inflight.add(scopes[0])
    flow.partitions[T1].inflight.add(scopes[1])
    assert flow.cancel_inflight([flow.partitions[T0]]) == 1
    assert scopes[0].cancel_called and not scopes[1].cancel_called
    assert flow.cancel_inflight() == 2
