"""BatchSource's backpressure, without a broker: at most max_in_flight batches handed over, and
the time the consumer thread waits for a free slot reported as it goes."""

from __future__ import annotations

import threading
import time
from typing import Any, cast

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from stream_infer.io.source import BatchSource, SourceBatch


class _Record:
    def __init__(self, offset: int) -> None:
        self._offset = offset

    def topic(self) -> str:
        return "in"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset


def _records(offset: int) -> list[Message]:
    return [cast(Any, _Record(offset))]


def test_a_full_source_pauses_until_a_batch_is_done_and_reports_the_pause() -> None:
    handed: list[SourceBatch] = []
    paused: list[float] = []
    source = BatchSource(
        {},
        ["in"],
        max_batch_size=1,
        max_wait_ms=1,
        max_in_flight=2,
        hand_off=handed.append,
        on_backpressure=paused.append,
    )
    source._send(_records(0))
    source._send(_records(1))
    assert source.in_flight == 2 and paused == []  # free slots: no pause

    third = threading.Thread(target=source._send, args=(_records(2),))
    started = time.monotonic()
    third.start()
    time.sleep(0.35)
    assert len(handed) == 2 and source.in_flight == 2  # paused: not handed over
    assert 0.1 <= sum(paused) <= time.monotonic() - started  # reported while it lasts
    source.done(handed[0])
    third.join(2.0)
    waited = time.monotonic() - started
    assert not third.is_alive()
    assert len(handed) == 3 and source.in_flight == 2
    assert 0.25 <= sum(paused) <= waited
    assert handed[2].offsets == {("in", 0): 3}


def test_a_stopping_source_gives_up_waiting_for_a_slot() -> None:
    handed: list[SourceBatch] = []
    source = BatchSource(
        {}, ["in"], max_batch_size=1, max_wait_ms=1, max_in_flight=1, hand_off=handed.append
    )
    source._send(_records(0))
    waiting = threading.Thread(target=source._send, args=(_records(1),))
    waiting.start()
    source._stopping.set()
    waiting.join(2.0)
    assert not waiting.is_alive()
    assert len(handed) == 1 and source.in_flight == 1


class _SlowCoordinator:
    """A consumer whose group coordinator does not answer (a broker died, or it is moving)."""

    def __init__(self) -> None:
        self.answers = False

    def get_watermark_offsets(
        self, tp: TopicPartition, timeout: float = 0, cached: bool = False
    ) -> tuple[int, int]:
        return 0, 10

    def committed(self, parts: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        if not self.answers:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT))
        return [TopicPartition(p.topic, p.partition, 4) for p in parts]

    def list_topics(self, topic: str, timeout: float) -> Any:
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT))


def test_lag_is_skipped_not_fatal_while_the_coordinator_does_not_answer() -> None:
    """Seen on a 3-node Apache Kafka cluster: a committed() that timed out in the lag
    measurement killed the consumer thread, and the worker served nothing more."""
    source = BatchSource(
        {}, ["in"], max_batch_size=1, max_wait_ms=1, max_in_flight=1, hand_off=lambda _: None
    )
    source.assignment = [("in", 0)]
    consumer = _SlowCoordinator()
    source._measure_lag(cast(Any, consumer))
    assert source.lag == {}
    consumer.answers = True
    source._measure_lag(cast(Any, consumer))
    assert source.lag == {("in", 0): 6}


class _Partition0:
    """A consumer whose partition ("in", 0) ends at offset 100 with 40 committed."""

    def __init__(self) -> None:
        self.stored: list[TopicPartition] = []

    def get_watermark_offsets(
        self, tp: TopicPartition, timeout: float = 0, cached: bool = False
    ) -> tuple[int, int]:
        return 0, 100

    def committed(self, parts: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        return [TopicPartition(p.topic, p.partition, 40) for p in parts]

    def store_offsets(self, offsets: list[TopicPartition]) -> None:
        self.stored.extend(offsets)

    def list_topics(self, topic: str, timeout: float) -> Any:
        meta = type("Topic", (), {"error": None, "partitions": {0: None, 1: None}})()
        return type("Metadata", (), {"topics": {topic: meta}})()


def test_lag_counts_from_the_stored_offset_like_kafkas_admin_api() -> None:
    """Handed over is not served: the lag is end minus stored (what will be committed), as
    Kafka's admin API and KEDA count it (end minus committed), not end minus handed over."""
    handed: list[SourceBatch] = []
    counts: list[dict[str, int]] = []
    source = BatchSource(
        {},
        ["in"],
        max_batch_size=1,
        max_wait_ms=1,
        max_in_flight=2,
        hand_off=handed.append,
        on_partition_counts=counts.append,
    )
    consumer = _Partition0()
    source.assignment = [("in", 0)]
    source._measure_lag(cast(Any, consumer))
    assert source.lag == {("in", 0): 60}  # from the committed offset
    assert counts == [{"in": 2}] and source.partition_counts == {"in": 2}
    source._send(_records(69))
    source._measure_lag(cast(Any, consumer))
    assert source.lag == {("in", 0): 60}  # handed over, not delivered
    source.done(handed[0])
    source._store_done(cast(Any, consumer))
    source._measure_lag(cast(Any, consumer))
    assert source.lag == {("in", 0): 30}
    assert [(tp.partition, tp.offset) for tp in consumer.stored] == [(0, 70)]
    assert counts == [{"in": 2}]  # told once, when the counts change


def test_lag_is_measured_while_the_source_is_paused() -> None:
    """Every slot taken (a model hangs, or cannot keep up): the lag must not freeze."""
    handed: list[SourceBatch] = []
    source = BatchSource(
        {}, ["in"], max_batch_size=1, max_wait_ms=1, max_in_flight=1, hand_off=handed.append
    )
    source._consumer = cast(Any, _Partition0())
    source.assignment = [("in", 0)]
    source._send(_records(0))
    waiting = threading.Thread(target=source._send, args=(_records(1),))
    waiting.start()
    time.sleep(0.3)
    assert len(handed) == 1  # paused
    assert source.lag == {("in", 0): 60}  # measured meanwhile
    source._stopping.set()
    waiting.join(2.0)
    assert not waiting.is_alive()
