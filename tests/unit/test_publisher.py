"""The publisher: failed deliveries are produced again, counted, and hold their batch's ticket.

A batch's input offsets are committed only once its ticket completes, so a ticket that
completed with a record still undelivered would be a lost record after a crash.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from stream_infer.core.events import OutRecord
from stream_infer.io import publisher as publisher_module
from stream_infer.io.publisher import Publisher, Ticket
from stream_infer.local.tansu import free_port
from tests.tickets import settled

Delivery = Callable[[KafkaError | None, Any], None]


class FakeMessage:
    def __init__(self, topic: str, key: bytes | None, value: bytes) -> None:
        self._topic, self._key, self._value = topic, key, value

    def topic(self) -> str:
        return self._topic

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes:
        return self._value


class FakeProducer:
    """Delivers on poll(); while the "broker" is down, records whose value is in `failing`
    fail with a message timeout, as librdkafka reports them."""

    last: FakeProducer | None = None

    def __init__(self, _conf: dict[str, Any]) -> None:
        self.fenced = False  # every delivery fails as from a producer the broker fenced
        self.failing: set[bytes] = set()
        self.down = threading.Event()
        self.produced: Counter[bytes] = Counter()
        self.acked: Counter[bytes] = Counter()
        self._queue: list[tuple[FakeMessage, Delivery]] = []
        self._lock = threading.Lock()
        FakeProducer.last = self

    def produce(self, topic: str, value: bytes, key: bytes | None, on_delivery: Delivery) -> None:
        with self._lock:
            self.produced[value] += 1
            self._queue.append((FakeMessage(topic, key, value), on_delivery))

    def poll(self, timeout: float) -> int:
        with self._lock:
            queued, self._queue = self._queue, []
        for msg, on_delivery in queued:
            if self.fenced:
                on_delivery(KafkaError(KafkaError.PRODUCER_FENCED), msg)
            elif self.down.is_set() and msg.value() in self.failing:
                on_delivery(KafkaError(KafkaError._MSG_TIMED_OUT), msg)
            else:
                self.acked[msg.value()] += 1
                on_delivery(None, msg)
        if not queued:
            time.sleep(timeout)
        return len(queued)

    def purge(self) -> None:
        with self._lock:
            queued, self._queue = self._queue, []
        for msg, on_delivery in queued:
            on_delivery(KafkaError(KafkaError._PURGE_QUEUE), msg)

    def __len__(self) -> int:
        with self._lock:
            return len(self._queue)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[FakeProducer]]:
    monkeypatch.setattr(publisher_module, "Producer", FakeProducer)
    yield FakeProducer
    FakeProducer.last = None


def _wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_a_failed_delivery_is_produced_again_and_holds_the_ticket_until_acked(
    fake: type[FakeProducer],
) -> None:
    retries: list[tuple[str, str]] = []
    pub = Publisher({}, retry_backoff_s=0.02, on_retry=lambda t, e: retries.append((t, e)))
    producer = fake.last
    assert producer is not None
    producer.failing = {b"b"}
    producer.down.set()
    ticket = Ticket()
    records = [OutRecord("preds", b"k", v) for v in (b"a", b"b", b"c")]
    try:
        pub.publish(records, ticket)
        _wait_for(lambda: len(retries) >= 3)  # b failed, was produced again, failed again...
        assert producer.acked == Counter({b"a": 1, b"c": 1})
        assert producer.produced[b"b"] >= 3
        assert not ticket.done, "the ticket completed with a record undelivered"
        assert ticket.pending == 1
        assert len(pub) >= 1
        producer.down.clear()
        assert settled(ticket, 5.0)
        assert producer.acked == Counter({b"a": 1, b"b": 1, b"c": 1})
        assert len(retries) >= 3  # each failure reported once (on_retry)
        assert set(retries) == {("preds", "_MSG_TIMED_OUT")}
        assert len(pub) == 0
    finally:
        assert pub.close(timeout_s=1.0) == 0


def test_the_ticket_resolves_on_the_event_loop_only_after_every_retry_succeeds(
    fake: type[FakeProducer],
) -> None:
    async def scenario() -> None:
        retries: list[tuple[str, str]] = []
        pub = Publisher({}, retry_backoff_s=0.02, on_retry=lambda t, e: retries.append((t, e)))
        producer = fake.last
        assert producer is not None
        producer.failing = {b"x", b"y"}
        producer.down.set()
        ticket = Ticket(asyncio.get_running_loop())
        pub.publish([OutRecord("preds", None, v) for v in (b"x", b"y", b"z")], ticket)
        waiter = asyncio.ensure_future(ticket.delivered())
        await asyncio.sleep(0.3)
        assert not waiter.done()
        producer.down.clear()
        await asyncio.wait_for(waiter, 5.0)
        assert producer.acked == Counter({b"x": 1, b"y": 1, b"z": 1})
        assert len(retries) >= 2
        assert pub.close(timeout_s=1.0) == 0

    asyncio.run(scenario())


def test_real_delivery_timeouts_are_retried_and_counted_and_never_complete_the_ticket() -> None:
    """librdkafka itself fails the deliveries: no broker listens at the bootstrap address."""
    retries: list[tuple[str, str]] = []
    conf = {
        "bootstrap.servers": f"127.0.0.1:{free_port()}",
        "message.timeout.ms": 50,
        "logger": logging.getLogger("librdkafka"),
        "log_level": 0,
    }
    pub = Publisher(conf, retry_backoff_s=0.05, on_retry=lambda t, e: retries.append((t, e)))
    ticket = Ticket()
    pub.publish([OutRecord("preds", b"k", b"1"), OutRecord("preds", b"k", b"2")], ticket)
    try:
        _wait_for(lambda: len(retries) >= 4)  # each record failed, was re-produced, failed again
        assert set(retries) == {("preds", "_MSG_TIMED_OUT")}
        assert not ticket.done
        assert ticket.pending == 2
        assert len(retries) >= 4
    finally:
        left = pub.close(timeout_s=0.3)
    assert left == 2, "undelivered records must be reported at shutdown, not dropped"
    assert not ticket.done


def test_a_producer_that_can_no_longer_deliver_is_replaced_and_its_records_delivered(
    fake: type[FakeProducer],
) -> None:
    retries: list[tuple[str, str]] = []
    pub = Publisher(
        {},
        retry_backoff_s=0.02,
        rebuild_interval_s=0.05,
        on_retry=lambda t, e: retries.append((t, e)),
    )
    first = fake.last
    assert first is not None
    first.fenced = True
    ticket = Ticket()
    values = [f"r{i}".encode() for i in range(50)]
    try:
        pub.publish([OutRecord("preds", None, v) for v in values], ticket)
        assert settled(ticket, 5.0), "the records were never delivered"
        second = fake.last
        assert second is not None and second is not first
        assert pub.rebuilds >= 1
        assert second.acked == Counter(dict.fromkeys(values, 1))  # each one, once
        assert first.acked == Counter()
        assert ("preds", "PRODUCER_FENCED") in retries
    finally:
        assert pub.close(timeout_s=1.0) == 0


class RaisingProducer(FakeProducer):
    """produce() raises KafkaException(code) for topics in ``raising``, as librdkafka's
    producev does for an error it knows before the record leaves (a record over
    message.max.bytes, a topic its metadata says does not exist)."""

    def __init__(self, conf: dict[str, Any]) -> None:
        super().__init__(conf)
        self.raising: dict[str, int] = {}
        self.attempts: Counter[str] = Counter()

    def produce(self, topic: str, value: bytes, key: bytes | None, on_delivery: Delivery) -> None:
        self.attempts[topic] += 1
        if topic in self.raising:
            raise KafkaException(KafkaError(self.raising[topic]))
        super().produce(topic, value, key, on_delivery)


@pytest.fixture
def raising(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[RaisingProducer]]:
    monkeypatch.setattr(publisher_module, "Producer", RaisingProducer)
    yield RaisingProducer
    FakeProducer.last = None


def test_a_record_produce_refuses_for_good_is_set_aside_and_its_ticket_fails(
    raising: type[RaisingProducer], caplog: pytest.LogCaptureFixture
) -> None:
    """Without a replacement (no undeliverable hook here): never retried, the ticket fails
    (its batch fails: nothing after it is committed), /healthz says why."""
    retries: list[tuple[str, str]] = []
    pub = Publisher(
        {},
        retry_backoff_s=0.01,
        refused_backoff_s=0.01,
        on_retry=lambda t, e: retries.append((t, e)),
    )
    producer = raising.last
    assert isinstance(producer, RaisingProducer)
    producer.raising["dlq"] = KafkaError.MSG_SIZE_TOO_LARGE
    big, small = Ticket(), Ticket()
    try:
        pub.publish([OutRecord("dlq", None, b"x" * 2000)], big)
        pub.publish([OutRecord("preds", None, b"p")], small)
        assert settled(small, 2.0), "a record set aside held up the others"
        time.sleep(0.3)  # 30 back-offs: a retry loop would have produced it ~30 times
        assert producer.attempts["dlq"] == 1, producer.attempts
        assert settled(big, 0) and not big.done and big.pending == 1  # failed, never delivered
        assert big.error is not None and big.error.topic == "dlq"
        assert retries == [("dlq", "MSG_SIZE_TOO_LARGE")]
        assert not [r for r in caplog.records if r.levelno == logging.WARNING]
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "'dlq' refused a 2000-byte record" in errors[0], errors
        assert pub.problem is not None and "MSG_SIZE_TOO_LARGE" in pub.problem
        assert pub.access.problems() == []  # not a missing permission
        assert pub._thread.is_alive()
    finally:
        started = time.monotonic()
        assert pub.close(timeout_s=10.0) == 1  # said undelivered, at once
        assert time.monotonic() - started < 2.0


def test_a_topic_produce_does_not_know_yet_is_retried_until_it_exists(
    raising: type[RaisingProducer],
) -> None:
    pub = Publisher({}, retry_backoff_s=0.01)
    producer = raising.last
    assert isinstance(producer, RaisingProducer)
    producer.raising["preds"] = KafkaError._UNKNOWN_TOPIC
    ticket = Ticket()
    try:
        pub.publish([OutRecord("preds", None, b"p")], ticket)
        _wait_for(lambda: producer.attempts["preds"] >= 3, 2.0)
        assert not ticket.done and pub.problem is None
        del producer.raising["preds"]  # created
        assert settled(ticket, 2.0)
        assert producer.acked == Counter({b"p": 1})
    finally:
        assert pub.close(timeout_s=1.0) == 0


def test_a_poll_thread_that_dies_is_a_problem_not_a_silent_stall(
    fake: type[FakeProducer], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pub = Publisher({}, retry_backoff_s=0.01, rebuild_interval_s=0.01)
    first = fake.last
    assert first is not None
    assert pub.problem is None

    def no_producer(_conf: dict[str, Any]) -> FakeProducer:
        raise KafkaException(KafkaError(KafkaError._INVALID_ARG, "ssl.ca.location unreadable"))

    monkeypatch.setattr(publisher_module, "Producer", no_producer)
    first.fenced = True  # the poll thread must replace it, and cannot
    ticket = Ticket()
    pub.publish([OutRecord("preds", None, b"p")], ticket)
    _wait_for(lambda: not pub._thread.is_alive(), 2.0)
    assert not ticket.done
    problem = pub.problem
    assert problem is not None and problem.startswith("the publisher's poll thread died: ")
    assert "ssl.ca.location unreadable" in problem
    assert [r.levelname for r in caplog.records if "poll thread died" in r.getMessage()] == [
        "CRITICAL"
    ]
    pub.close(timeout_s=0.1)
