"""BatchSource's commit path against a consumer that behaves like librdkafka's, without a
broker: the consumer thread runs for real; offsets are stored and committed as librdkafka
does (close() revokes the assignment through the rebalance callback, then commits what is
stored); broker calls time out with KafkaException(_TIMED_OUT).

What is checked: a failed batch (hardening item 1), the one drain deadline of a close and the
revocation it brings (item 17), revocation, a close whose commit fails, and a lag probe whose
every call times out (item 5, 19b).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from stream_infer.io.source import BatchSource, SourceBatch

TIMED_OUT = KafkaError(KafkaError._TIMED_OUT, "Local: Timed out")


def _record(partition: int, offset: int) -> Message:
    return Message(topic="in", partition=partition, offset=offset, value=b"{}")


class Librdkafka:
    """A consumer of topic "in": consume() hands out ``records``; store_offsets keeps offsets of
    assigned partitions only (others are ignored without an error, as librdkafka does);
    commit() commits what is stored; close() calls the revocation callback, then commits.
    ``slow``: every broker round trip (committed, list_topics, watermarks from the brokers)
    waits its timeout and raises _TIMED_OUT."""

    def __init__(self, partitions: list[int]) -> None:
        self.partitions = partitions
        self.records: list[Message] = []
        self.stored: dict[tuple[str, int], int] = {}
        self.committed_offsets: dict[tuple[str, int], int] = {}
        self.commits = 0
        self.commit_error: KafkaError | None = None
        self.slow = False
        self.closed = False
        self.assigned: set[tuple[str, int]] = set()
        self.on_revoke: Callable[[Any, list[TopicPartition]], None] | None = None
        self.broker_calls = 0
        self._lock = threading.Lock()

    # --- group membership
    def subscribe(self, topics: list[str], on_assign: Any = None, on_revoke: Any = None) -> None:
        self.on_revoke = on_revoke
        parts = [TopicPartition("in", p) for p in self.partitions]
        self.assigned = {("in", p) for p in self.partitions}
        if on_assign is not None:
            on_assign(self, parts)

    def revoke(self, partitions: list[int]) -> None:
        """A rebalance takes these partitions away (called on the consumer thread's behalf)."""
        assert self.on_revoke is not None
        self.on_revoke(self, [TopicPartition("in", p) for p in partitions])
        self.assigned -= {("in", p) for p in partitions}

    # --- records
    def add(self, records: list[Message]) -> None:
        with self._lock:
            self.records += records

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]:
        with self._lock:
            out, self.records = self.records[:num_messages], self.records[num_messages:]
        if not out:
            time.sleep(min(max(timeout, 0.0), 0.01))
        return out

    # --- offsets
    def store_offsets(self, offsets: list[TopicPartition]) -> None:
        for tp in offsets:
            if (tp.topic, tp.partition) in self.assigned:
                self.stored[(tp.topic, tp.partition)] = tp.offset

    def commit(self, asynchronous: bool = True) -> None:
        self.commits += 1
        if self.commit_error is not None:
            raise KafkaException(self.commit_error)
        new = {tp: o for tp, o in self.stored.items() if self.committed_offsets.get(tp) != o}
        if not new:
            raise KafkaException(KafkaError(KafkaError._NO_OFFSET))
        self.committed_offsets.update(new)

    def close(self) -> None:
        if self.on_revoke is not None and self.assigned:
            self.revoke(sorted(p for _, p in self.assigned))
        self.stored.clear()
        self.closed = True

    # --- broker round trips (the lag probe)
    def _round_trip(self, timeout: float) -> None:
        self.broker_calls += 1
        if self.slow:
            time.sleep(min(timeout, 0.05))
            raise KafkaException(TIMED_OUT)

    def committed(self, parts: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        self._round_trip(timeout)
        return [TopicPartition(p.topic, p.partition, -1001) for p in parts]

    def list_topics(self, topic: str, timeout: float) -> Any:
        self._round_trip(timeout)
        meta = type("Topic", (), {"error": None, "partitions": dict.fromkeys(self.partitions)})()
        return type("Metadata", (), {"topics": {topic: meta}})()

    def get_watermark_offsets(
        self, tp: TopicPartition, timeout: float = 0, cached: bool = False
    ) -> tuple[int, int]:
        if cached:
            raise KafkaException(TIMED_OUT)  # nothing cached: librdkafka says so this way too
        self._round_trip(timeout)
        return 0, 100


class Running:
    """A BatchSource whose consumer thread runs against a Librdkafka fake."""

    def __init__(
        self, partitions: list[int], *, batch: int = 2, in_flight: int = 8, drain_s: float = 5.0
    ) -> None:
        self.consumer = Librdkafka(partitions)
        self.handed: list[SourceBatch] = []
        self.source = BatchSource(
            {"group.id": "g"},
            ["in"],
            max_batch_size=batch,
            max_wait_ms=1,
            max_in_flight=in_flight,
            hand_off=self.handed.append,
            drain_timeout_s=drain_s,
        )
        self.source._consumer = self.consumer  # type: ignore[assignment]

    def start(self) -> None:
        self.source._thread.start()

    def wait_handed(self, n: int, timeout_s: float = 2.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.handed) < n:
            assert time.monotonic() < deadline, f"{len(self.handed)} batches handed, not {n}"
            time.sleep(0.005)


@pytest.fixture
def running() -> Iterator[Callable[..., Running]]:
    made: list[Running] = []

    def make(partitions: list[int], **kw: Any) -> Running:
        made.append(Running(partitions, **kw))
        return made[-1]

    yield make
    for r in made:
        r.source.stop(0.1)


def test_nothing_at_or_after_a_failed_batch_is_handed_out_stored_or_committed(
    running: Callable[..., Running],
) -> None:
    """Item 1: the runtime failed batch 1 and then (an agent restarted by faust during the
    shutdown) marked batches 2 and 3 done; close committed past the failed batch."""
    r = running([0])
    r.consumer.add([_record(0, o) for o in range(8)])
    r.start()
    r.wait_handed(4)
    b0, b1, b2, b3 = r.handed
    r.source.done(b0)
    r.source.fail(b1, "publish raised")
    r.source.done(b2)
    r.source.done(b3)
    r.source._thread.join(2.0)  # the thread ends by itself: it commits the prefix and closes
    assert not r.source._thread.is_alive()
    assert r.consumer.closed
    assert r.consumer.committed_offsets == {("in", 0): 2}  # b0 only: b1 starts at offset 2
    r.consumer.add([_record(0, o) for o in range(8, 12)])
    time.sleep(0.05)
    assert len(r.handed) == 4  # nothing more handed out
    assert r.source.failure == "publish raised"


def test_a_batch_delivered_during_the_close_is_committed(running: Callable[..., Running]) -> None:
    r = running([0, 1])
    r.consumer.add([_record(0, 0), _record(1, 0), _record(0, 1), _record(1, 1)])
    r.start()
    r.wait_handed(2)
    r.source.done(r.handed[0])
    threading.Timer(0.2, r.source.done, args=(r.handed[1],)).start()
    started = time.monotonic()
    r.source.stop(timeout_s=5.0)
    assert 0.15 <= time.monotonic() - started < 2.0  # waited for it, not for the deadline
    assert r.consumer.committed_offsets == {("in", 0): 2, ("in", 1): 2}
    assert r.consumer.closed


def test_a_close_waits_for_batches_in_flight_within_one_deadline(
    running: Callable[..., Running],
) -> None:
    """Item 17: _close waited drain_timeout_s for a stuck batch, then consumer.close()
    revoked the assignment and _revoked waited drain_timeout_s again: 60 s by default."""
    r = running([0], drain_s=0.4)
    r.consumer.add([_record(0, o) for o in range(4)])
    r.start()
    r.wait_handed(2)
    r.source.done(r.handed[0])  # the second is stuck
    started = time.monotonic()
    r.source.stop(timeout_s=0.4)
    took = time.monotonic() - started
    assert 0.35 <= took < 0.6, f"stop took {took:.2f} s"
    assert r.consumer.committed_offsets == {("in", 0): 2}  # the stuck batch is not committed


def test_a_source_ended_by_a_failed_batch_drains_within_its_own_deadline(
    running: Callable[..., Running],
) -> None:
    r = running([0], drain_s=0.3)
    r.consumer.add([_record(0, o) for o in range(6)])
    r.start()
    r.wait_handed(3)
    started = time.monotonic()
    r.source.fail(r.handed[1], "x")  # batch 0 still in flight: worth waiting for, up to 0.3 s
    r.source._thread.join(2.0)
    assert 0.25 <= time.monotonic() - started < 0.6
    assert r.consumer.closed and r.consumer.committed_offsets == {}


def test_revocation_commits_the_prefix_and_a_late_batch_stores_nothing_for_revoked_partitions(
    running: Callable[..., Running],
) -> None:
    r = running([0, 1], batch=1, drain_s=0.1)
    source, consumer = r.source, r.consumer
    source._assigned(consumer, [TopicPartition("in", 0), TopicPartition("in", 1)])
    consumer.assigned = {("in", 0), ("in", 1)}
    source._send([_record(0, 5)])
    source._send([_record(1, 7)])
    b0, b1 = r.handed
    consumer.on_revoke = source._revoked
    consumer.revoke([0])  # b0 (partition 0) still in flight: waited 0.1 s, nothing committed
    assert consumer.commits == 1 and consumer.committed_offsets == {}
    assert source.assignment == [("in", 1)]
    source.done(b1)
    source.done(b0)  # late
    source._store_done(consumer)  # type: ignore[arg-type]
    assert consumer.stored == {("in", 1): 8}  # nothing for the revoked partition 0
    assert ("in", 0) not in source._positions


def test_a_commit_that_fails_on_close_still_closes_the_consumer(
    running: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    r = running([0])
    r.consumer.commit_error = KafkaError(KafkaError.REBALANCE_IN_PROGRESS)
    r.consumer.add([_record(0, 0), _record(0, 1)])
    r.start()
    r.wait_handed(1)
    r.source.done(r.handed[0])
    r.source.stop(timeout_s=1.0)
    assert r.consumer.closed
    assert r.source.error is None
    assert any("commit failed" in rec.getMessage() for rec in caplog.records)


def test_a_lag_probe_whose_every_call_times_out_never_ends_the_consumer_thread(
    running: Callable[..., Running],
) -> None:
    """Item 5 (19b): committed(), list_topics() and get_watermark_offsets() all raise
    KafkaException(_TIMED_OUT) after waiting, as librdkafka does with a dead coordinator and
    leaders. The probe runs at every step here; consumption goes on, within its budget."""
    r = running([0, 1], batch=1, in_flight=1000)
    r.source.lag_interval_s = 0.0
    r.source.lag_budget_s = 0.1
    r.consumer.slow = True
    r.start()
    for o in range(20):
        r.consumer.add([_record(o % 2, o // 2)])
        time.sleep(0.02)
    r.wait_handed(20, timeout_s=5.0)
    assert r.source._thread.is_alive() and r.source.error is None
    assert r.consumer.broker_calls > 3  # it kept trying
    assert r.source.lag == {}  # never measured: nothing made up


def test_a_lag_probe_that_times_out_keeps_the_last_figures(running: Callable[..., Running]) -> None:
    r = running([0])
    source, consumer = r.source, r.consumer
    source.assignment = [("in", 0)]
    source._measure_lag(consumer)  # type: ignore[arg-type]
    assert source.lag == {("in", 0): 100}  # no commit: from the low watermark (0)
    assert source.partition_counts == {"in": 1}
    consumer.slow = True
    started = time.monotonic()
    source._measure_lag(consumer)  # type: ignore[arg-type]
    assert time.monotonic() - started <= source.lag_budget_s + 0.1
    assert source.lag == {("in", 0): 100} and source.partition_counts == {"in": 1}
