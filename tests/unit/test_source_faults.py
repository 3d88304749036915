"""BatchSource against consumers that fail the way librdkafka fails, without a broker: fatal
errors, refusals without a topic, a session timeout the broker refuses, slow or dead brokers
during the lag measurement, and revocations racing with stored offsets."""

from __future__ import annotations

import logging
import time
from typing import Any, cast

import pytest
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from stream_infer.io.source import BatchSource, SourceBatch

# librdkafka's "no offset" (OFFSET_INVALID) in watermarks and committed offsets.
INVALID = -1001


class _Failed:
    """What consume() returns for a consumer error: a message carrying only the error."""

    def __init__(self, err: KafkaError, topic: str | None = None) -> None:
        self._err, self._topic = err, topic

    def error(self) -> KafkaError:
        return self._err

    def topic(self) -> str | None:
        return self._topic

    def partition(self) -> int:
        return -1


class _Broker:
    """A consumer over partitions ("in", p), each with (low, high) watermarks and a committed
    offset. ``slow_s``: every blocking call takes its whole timeout up to this long and then
    fails, as a call to a dead leader or coordinator does. Calls are counted."""

    def __init__(self, marks: dict[int, tuple[int, int]], committed: dict[int, int]) -> None:
        self.marks, self.committed_at = marks, committed
        self.cache: dict[int, tuple[int, int]] = {}
        self.slow_s = 0.0
        self.failing: set[int] = set()
        self.calls: list[str] = []
        self.errors: list[Any] = []
        self.closed = False

    def _block(self, timeout: float) -> None:
        if self.slow_s:
            time.sleep(min(timeout, self.slow_s))
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT))

    def get_watermark_offsets(
        self, tp: TopicPartition, timeout: float = 0, cached: bool = False
    ) -> tuple[int, int]:
        if cached:
            self.calls.append("cached")
            return self.cache.get(tp.partition, (INVALID, INVALID))
        self.calls.append("watermarks")
        self._block(timeout)
        if tp.partition in self.failing:
            raise KafkaException(KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION))
        return self.marks[tp.partition]

    def committed(self, parts: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        self.calls.append("committed")
        self._block(timeout)
        return [
            TopicPartition(p.topic, p.partition, self.committed_at.get(p.partition, INVALID))
            for p in parts
        ]

    def list_topics(self, topic: str, timeout: float) -> Any:
        self.calls.append("metadata")
        self._block(timeout)
        meta = type("Topic", (), {"error": None, "partitions": dict.fromkeys(self.marks)})()
        return type("Metadata", (), {"topics": {topic: meta}})()

    def store_offsets(self, offsets: list[TopicPartition]) -> None:
        pass  # librdkafka ignores partitions not assigned, without an error

    def subscribe(self, topics: list[str], **_: Any) -> None:
        pass

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Any]:
        errors, self.errors = self.errors, []
        return errors

    def commit(self, asynchronous: bool = True) -> None:
        raise KafkaException(KafkaError(KafkaError._NO_OFFSET))

    def close(self) -> None:
        self.closed = True


def _source(topics: list[str] | None = None, **conf: Any) -> BatchSource:
    return BatchSource(
        {"group.id": "g"} | conf,
        topics or ["in"],
        max_batch_size=10,
        max_wait_ms=1,
        max_in_flight=4,
        hand_off=lambda _: None,
    )


# --- 1. errors --------------------------------------------------------------------------------


def test_a_fatal_consumer_error_ends_the_source_with_it() -> None:
    """librdkafka makes e.g. a fenced static member or a KIP-848 group refusal fatal: the
    consumer is unusable. It used to be a warning, the thread went on, /healthz stayed 200."""
    source = _source()
    consumer = _Broker({0: (0, 0)}, {})
    fenced = KafkaError(KafkaError.FENCED_INSTANCE_ID, "fenced by a newer instance", fatal=True)
    consumer.errors = [_Failed(fenced)]
    source._consumer = cast(Any, consumer)
    source._run()  # returns: the thread would end
    assert isinstance(source.error, KafkaException)
    assert source.error.args[0].code() == KafkaError.FENCED_INSTANCE_ID
    assert consumer.closed


def test_a_fatal_group_refusal_is_fatal_not_a_refusal_to_wait_for() -> None:
    source = _source()
    refused = KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED, fatal=True)
    with pytest.raises(KafkaException):
        source._errors([cast(Message, _Failed(refused))])


def test_a_topic_refusal_without_a_topic_refuses_the_subscription(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Kafka >= 4.0 fails the whole KIP-848 heartbeat when any subscribed topic lacks
    Describe (KAFKA-18813): the error names no topic."""
    source = _source(["in", "labels"])
    refused = cast(Message, _Failed(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)))
    with caplog.at_level(logging.ERROR):
        source._errors([refused])
        source._errors([refused])
    (problem,) = source.access.problems()
    assert "Read on one of the subscribed topics 'in, labels'" in problem
    assert "TOPIC_AUTHORIZATION_FAILED" in problem
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1  # once
    source._assigned(cast(Any, None), [TopicPartition("in", 0)])
    assert source.access.problems() == []


def test_a_session_timeout_the_broker_refuses_is_reported_once_until_assigned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """session.timeout.ms outside group.min/max.session.timeout.ms: JoinGroup fails on every
    retry and nothing is consumed. It was a warning per retry, a silent stall for /healthz."""
    source = _source(**{"session.timeout.ms": 3000})
    err = KafkaError(KafkaError.INVALID_SESSION_TIMEOUT, "JoinGroup failed")
    with caplog.at_level(logging.ERROR):
        for _ in range(3):
            source._errors([cast(Message, _Failed(err))])
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert source.group_problem is not None and errors == [source.group_problem]
    assert "kafka.session_timeout_ms=3000" in source.group_problem
    assert "group.min.session.timeout.ms" in source.group_problem
    assert "group.max.session.timeout.ms" in source.group_problem
    assert source.error is None  # librdkafka keeps retrying: not fatal
    source._assigned(cast(Any, None), [TopicPartition("in", 0)])
    assert source.group_problem is None


# --- 2. the lag measurement's cost ------------------------------------------------------------


def test_a_lag_measurement_with_dead_brokers_blocks_at_most_its_budget() -> None:
    """With a leader down each call waits its whole timeout (1 s): 2 topics' metadata and 8
    partitions' watermarks took 10 s, and the next one was already due: every step. The
    metadata refresh and the lag probe each have a budget of their own."""
    source = _source(["in", "labels"])
    consumer = _Broker({p: (0, 100) for p in range(8)}, {})
    consumer.slow_s = 1.0
    source.assignment = [("in", p) for p in range(8)]
    started = time.monotonic()
    source._measure_lag(cast(Any, consumer))
    took = time.monotonic() - started
    print(f"\nmeasurement against dead brokers: {took:.2f} s, {len(consumer.calls)} calls")
    assert took <= source.metadata_budget_s + source.lag_budget_s + 0.2
    # Due again a whole interval after it ended, not after it started.
    assert source._lag_due >= time.monotonic() + source.lag_interval_s - 0.1


def test_while_consuming_the_lag_comes_from_cached_watermarks_without_blocking() -> None:
    source = _source()
    consumer = _Broker({0: (0, 100), 1: (0, 50)}, {0: 40, 1: 50})
    consumer.cache = {0: (INVALID, 100), 1: (INVALID, 50)}
    source.assignment = [("in", 0), ("in", 1)]
    source._positions = {("in", 0): 40, ("in", 1): 50}
    source._lag_within(cast(Any, consumer), time.monotonic() + 1, paused=False)
    assert source.lag == {("in", 0): 60, ("in", 1): 0}
    assert consumer.calls == ["cached", "cached"]
    # Paused, nothing is fetched and the cache goes stale: the brokers are asked.
    consumer.calls.clear()
    source._lag_within(cast(Any, consumer), time.monotonic() + 1, paused=True)
    assert consumer.calls == ["watermarks", "watermarks"]


def test_committed_offsets_are_asked_once_for_all_partitions() -> None:
    source = _source()
    consumer = _Broker({p: (0, 100) for p in range(4)}, dict.fromkeys(range(4), 90))
    source.assignment = [("in", p) for p in range(4)]
    source._lag_within(cast(Any, consumer), time.monotonic() + 1, paused=False)
    assert consumer.calls.count("committed") == 1
    assert source.lag == {("in", p): 10 for p in range(4)}


# --- 3. the lag's correctness -----------------------------------------------------------------


def test_a_batch_done_after_its_partition_was_revoked_does_not_bring_it_back() -> None:
    handed: list[SourceBatch] = []
    source = BatchSource(
        {},
        ["in"],
        max_batch_size=1,
        max_wait_ms=1,
        max_in_flight=2,
        hand_off=handed.append,
        drain_timeout_s=0.05,
    )
    consumer = _Broker({0: (0, 100), 1: (0, 100)}, {0: 10, 1: 10})
    source.assignment = [("in", 0), ("in", 1)]
    source._send([cast(Any, _Record(0, 19))])
    source._revoked(cast(Any, consumer), [TopicPartition("in", 0)])  # the batch still in flight
    source.done(handed[0])
    source._store_done(cast(Any, consumer))
    assert ("in", 0) not in source._positions
    source._lag_within(cast(Any, consumer), time.monotonic() + 1, paused=True)
    assert source.lag == {("in", 1): 90}


def test_without_a_commit_the_lag_counts_from_the_low_watermark() -> None:
    """Retention deleted the topic's first 70 records: a new group starts at 70, not 0."""
    source = _source()
    consumer = _Broker({0: (70, 100)}, {})
    source.assignment = [("in", 0)]
    source._lag_within(cast(Any, consumer), time.monotonic() + 1, paused=False)
    assert source.lag == {("in", 0): 30}
    # A commit behind the low watermark counts from it too (the consumer resets to it).
    consumer.committed_at = {0: 20}
    source._lag_within(cast(Any, consumer), time.monotonic() + 1, paused=False)
    assert source.lag == {("in", 0): 30}


def test_a_partition_that_cannot_be_measured_keeps_its_last_figure() -> None:
    """Its series vanished from the gauge during broker trouble, when it matters."""
    source = _source()
    consumer = _Broker({0: (0, 100), 1: (0, 100)}, {0: 40, 1: 80})
    source.assignment = [("in", 0), ("in", 1)]
    source._lag_within(cast(Any, consumer), time.monotonic() + 1, paused=True)
    assert source.lag == {("in", 0): 60, ("in", 1): 20}
    consumer.failing = {1}
    consumer.marks[0] = (0, 110)
    source._lag_within(cast(Any, consumer), time.monotonic() + 1, paused=True)
    assert source.lag == {("in", 0): 70, ("in", 1): 20}


def test_revoked_partitions_leave_the_lag_at_once() -> None:
    source = _source()
    consumer = _Broker({0: (0, 100), 1: (0, 100)}, {0: 40, 1: 80})
    source.assignment = [("in", 0), ("in", 1)]
    source._lag_within(cast(Any, consumer), time.monotonic() + 1, paused=True)
    source._revoked(cast(Any, consumer), [TopicPartition("in", 1)])
    assert source.lag == {("in", 0): 60}


class _Record:
    def __init__(self, partition: int, offset: int) -> None:
        self._partition, self._offset = partition, offset

    def topic(self) -> str:
        return "in"

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset


def test_a_group_that_refuses_the_session_timeout_fails_the_health_check() -> None:
    from stream_infer.runtime.worker import InferenceRuntime
    from stream_infer.settings import parse_topology
    from tests.unit.test_settings import minimal

    runtime = InferenceRuntime(parse_topology(minimal(), env={}))
    try:
        runtime.kafka.source = _source(**{"session.timeout.ms": 3000})
        assert runtime.health()[0] == 200
        err = KafkaError(KafkaError.INVALID_SESSION_TIMEOUT, "JoinGroup failed")
        runtime.kafka.source._errors([cast(Message, _Failed(err))])
        status, body = runtime.health()
        assert status == 500 and body["problems"] == [runtime.kafka.source.group_problem], body
    finally:
        runtime.threads.inference.shutdown(wait=False)
        runtime.threads.loader.shutdown(wait=False)
