"""Replaying the control log ends where the log ended when the replay began, whatever the log
holds there: records, nothing (every record deleted by retention: low = high > 0), or a
transaction marker (an offset no record is ever returned for). The fake consumer behaves as
librdkafka does: markers take an offset but are never returned; position() is the offset after
the last record or marker consumed; a partition at its end yields a _PARTITION_EOF event (when
enable.partition.eof is set) carrying the end offset."""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from stream_infer.io import control_log as control_log_module
from stream_infer.io.control_log import ControlLog
from stream_infer.io.reachability import Reachability


class FakeMessage:
    def __init__(self, offset: int, value: bytes | None, error: KafkaError | None = None) -> None:
        self._offset, self._value, self._error = offset, value, error

    def error(self) -> KafkaError | None:
        return self._error

    def offset(self) -> int:
        return self._offset

    def partition(self) -> int:
        return 0

    def value(self) -> bytes | None:
        return self._value

    def timestamp(self) -> tuple[int, int]:
        return (1, 0)


class _Meta:
    def __init__(self) -> None:
        self.error = None
        self.partitions = {0: object()}


class _Topics:
    def __init__(self, topic: str) -> None:
        self.topics = {topic: _Meta()}


class FakeLogConsumer:
    """One partition: ``records`` maps offset -> value (None: a transaction marker);
    offsets below ``low`` are deleted."""

    records: ClassVar[dict[int, bytes | None]] = {}
    low: ClassVar[int] = 0
    high: ClassVar[int] = 0

    def __init__(self, conf: dict[str, Any]) -> None:
        self.conf = conf
        self._pos = -1
        self._eof_sent = False

    def list_topics(self, topic: str, timeout: float) -> _Topics:
        return _Topics(topic)

    def assign(self, parts: list[TopicPartition]) -> None:
        self._pos = self.low  # OFFSET_BEGINNING: the first offset still there

    def get_watermark_offsets(self, part: TopicPartition, timeout: float) -> tuple[int, int]:
        return self.low, self.high

    def position(self, parts: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(p.topic, p.partition, self._pos) for p in parts]

    def consume(self, num_messages: int, timeout: float) -> list[FakeMessage]:
        out: list[FakeMessage] = []
        while len(out) < num_messages and self._pos < self.high:
            value = self.records.get(self._pos)
            self._pos += 1
            if value is not None:  # a marker is skipped, but the position moves past it
                out.append(FakeMessage(self._pos - 1, value))
        if self._pos >= self.high and not self._eof_sent and self.conf.get("enable.partition.eof"):
            self._eof_sent = True
            eof = KafkaError(KafkaError._PARTITION_EOF)
            out.append(FakeMessage(self._pos, None, eof))
        return out

    def close(self) -> None:
        pass


@pytest.fixture
def fake_log(monkeypatch: pytest.MonkeyPatch) -> type[FakeLogConsumer]:
    monkeypatch.setattr(control_log_module, "Consumer", FakeLogConsumer)
    return FakeLogConsumer


def values(fake: type[FakeLogConsumer], timeout_s: float = 2.0) -> list[bytes | None]:
    log = ControlLog({}, "ctl")
    try:
        return [m.value() for m in log.replay(timeout_s=timeout_s)]
    finally:
        log.close()


def test_a_log_of_records_is_replayed_in_full(fake_log: type[FakeLogConsumer]) -> None:
    fake_log.records, fake_log.low, fake_log.high = {0: b"a", 1: b"b", 2: b"c"}, 0, 3
    assert values(fake_log) == [b"a", b"b", b"c"]


def test_an_empty_log_is_replayed_at_once(fake_log: type[FakeLogConsumer]) -> None:
    fake_log.records, fake_log.low, fake_log.high = {}, 0, 0
    assert values(fake_log) == []


def test_a_log_whose_every_record_expired_is_replayed_at_once(
    fake_log: type[FakeLogConsumer],
) -> None:
    fake_log.records, fake_log.low, fake_log.high = {}, 5, 5
    assert values(fake_log) == []


def test_a_log_that_ends_with_a_transaction_marker_is_replayed(
    fake_log: type[FakeLogConsumer],
) -> None:
    # a, then a transactional b and its commit marker at offset 2.
    fake_log.records, fake_log.low, fake_log.high = {0: b"a", 1: b"b", 2: None}, 0, 3
    assert values(fake_log) == [b"a", b"b"]


def test_a_log_with_markers_and_expired_records(fake_log: type[FakeLogConsumer]) -> None:
    fake_log.records = {3: b"c", 4: None, 5: b"d", 6: None}
    fake_log.low, fake_log.high = 3, 7
    assert values(fake_log) == [b"c", b"d"]


# --- the follow thread: errors are not ignored (review of the hardening work) ------------------


class ErrorsThenRecords(FakeLogConsumer):
    """After the replay: the Read refused twice, then granted (a record), then fatal."""

    script: ClassVar[list[FakeMessage]] = []

    def consume(self, num_messages: int, timeout: float) -> list[FakeMessage]:
        if self.script:
            return [self.script.pop(0)]
        return []


def test_the_follow_thread_reports_a_refused_read_and_its_grant_and_dies_on_a_fatal_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import time

    from stream_infer.io.access import AccessRefusals

    refused = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)
    fatal = KafkaError(KafkaError._FATAL, fatal=True)
    ErrorsThenRecords.script = [
        # Seen on Kafka with ACLs: the group-less consumer's coordinator lookup is refused.
        FakeMessage(0, None, KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED)),
        FakeMessage(0, None, refused),
        FakeMessage(0, None, refused),
    ]
    monkeypatch.setattr(control_log_module, "Consumer", ErrorsThenRecords)
    access = AccessRefusals()
    log = ControlLog({}, "ctl", access=access)
    got: list[bytes | None] = []
    log.follow(lambda msg: got.append(msg.value()))
    deadline = time.monotonic() + 5
    while ErrorsThenRecords.script and time.monotonic() < deadline:
        time.sleep(0.01)
    (problem,) = access.problems()  # the topic's refusal only
    assert "Read on topic 'ctl' (TOPIC_AUTHORIZATION_FAILED)" in problem
    ErrorsThenRecords.script = [FakeMessage(1, b"cmd"), FakeMessage(2, None, fatal)]
    while log.alive and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got == [b"cmd"]
    assert not access.problems(), "a record read again is the grant"
    assert not log.alive and log.error is not None, "a fatal consumer cannot read commands again"
    log.close()


# --- the follow thread and the cluster's reachability (review of issue 18 item 7) -------------


class Idle(FakeLogConsumer):
    """A log with nothing new after the replay: no record, no partition end, ever. Its
    metadata answers unless ``down``."""

    down: ClassVar[bool] = False
    asked: ClassVar[int] = 0

    def consume(self, num_messages: int, timeout: float) -> list[FakeMessage]:
        return []

    def list_topics(self, topic: str, timeout: float) -> _Topics:
        type(self).asked += 1
        if self.down:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "Failed to get metadata"))
        return _Topics(topic)


def _cleared_within(reach: Reachability, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while reach.mark is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    return reach.mark is None


@pytest.mark.parametrize(
    ("records", "what"), [({0: b"cmd"}, "a command"), ({}, "a partition's end")]
)
def test_what_the_follow_thread_fetches_clears_an_outage_mark(
    fake_log: type[FakeLogConsumer], records: dict[int, bytes | None], what: str
) -> None:
    """The batch source, which clears a stale mark, does not run before the routing loads."""
    fake_log.records, fake_log.low, fake_log.high = records, 0, len(records)
    reach = Reachability()
    reach.lost("no broker answers the control log")
    log = ControlLog({}, "ctl", reachability=reach)
    log.follow(lambda _msg: None)
    try:
        assert _cleared_within(reach, 2.0), what
    finally:
        log.close()


def test_an_idle_follow_thread_asks_the_cluster_while_an_outage_is_marked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(control_log_module, "Consumer", Idle)
    Idle.down, Idle.asked = True, 0
    reach = Reachability()
    log = ControlLog({}, "ctl", reachability=reach)
    log.probe_interval_s = 0.05
    log.follow(lambda _msg: None)
    try:
        time.sleep(0.3)
        assert Idle.asked == 0, "nothing asked while the cluster counts as reachable"
        reach.lost("no broker answers the producer")
        assert not _cleared_within(reach, 0.5) and Idle.asked >= 1, "no broker: the mark stands"
        Idle.down = False
        assert _cleared_within(reach, 2.0), "the first answer clears it"
    finally:
        log.close()


def test_the_follow_threads_suppressed_errors_are_flushed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(control_log_module, "Consumer", FakeLogConsumer)
    log = ControlLog({}, "ctl")
    log._repeats.interval_s = 0.05
    caplog.set_level(logging.WARNING, logger="stream_infer.io.control_log")
    for _ in range(3):
        log._error(KafkaError(KafkaError._TRANSPORT, "Connection refused"))
    time.sleep(0.1)
    assert log.flush_due() == 1
    assert caplog.records[-1].getMessage() == (
        "control log ctl: Connection refused (librdkafka retries) (2 like it in the last 0 s)"
    )
    log.close()
