"""The publisher against producers that fail the way librdkafka fails, without a broker.

- a producer in librdkafka's fatal state: every produce() raises _FATAL and what it holds
  fails with _FATAL, while a new Producer works (hardening item 4);
- delivery errors classified: a record no retry delivers is never a retry loop: it becomes a
  dead letter, or its ticket fails (item 10); the age of the oldest unacknowledged ticket;
- a full local queue while the poll thread itself produces (it used to sleep, waiting for a
  poll only it could make: a self-deadlock) (item 10);
- per-topic order through retries, refusals and producer replacements (item 11).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
from confluent_kafka import KafkaError, KafkaException

from stream_infer.core.events import OutRecord
from stream_infer.errors import DeliveryError
from stream_infer.io import publisher as publisher_module
from stream_infer.io.publisher import Failure, Publisher, Ticket, classify
from tests.tickets import settled
from tests.unit.test_publisher import Delivery, FakeProducer, _wait_for

FATAL = KafkaError(KafkaError._FATAL, "Producing not allowed after a fatal error", fatal=True)


class Broker(FakeProducer):
    """A FakeProducer whose deliveries all land in one log (shared by every producer made, in
    delivery order), with librdkafka's failure modes switched on per instance:

    - ``fatal_after``: after that many deliveries this producer enters the fatal state:
      produce() raises _FATAL, and what it holds fails with _FATAL;
    - ``refused``: topics whose records fail with TOPIC_AUTHORIZATION_FAILED;
    - ``errors``: value prefix -> error code a delivery fails with (every time);
    - ``paused``: poll() serves nothing;
    - ``max_queue``: produce() raises BufferError past this many queued records;
    - ``fail_once``: values whose first delivery fails with a message timeout.
    """

    log: ClassVar[list[tuple[str, bytes]]] = []
    made: ClassVar[list[Broker]] = []

    def __init__(self, conf: dict[str, Any]) -> None:
        super().__init__(conf)
        self.fatal_after: int | None = None
        self.fatal = False
        self.refused: set[str] = set()
        self.errors: dict[bytes, int] = {}
        self.max_queue: int | None = None
        self.fail_once: set[bytes] = set()
        self.paused = False
        self.delivered = 0
        Broker.made.append(self)

    def produce(self, topic: str, value: bytes, key: bytes | None, on_delivery: Delivery) -> None:
        if self.fatal:
            raise KafkaException(FATAL)
        if self.max_queue is not None and len(self) >= self.max_queue:
            raise BufferError("Local: Queue full")
        super().produce(topic, value, key, on_delivery)

    def _error_for(self, value: bytes) -> int | None:
        return next((code for p, code in self.errors.items() if value.startswith(p)), None)

    def poll(self, timeout: float) -> int:
        if self.paused:
            time.sleep(timeout)
            return 0
        with self._lock:
            queued, self._queue = self._queue, []
        for msg, on_delivery in queued:
            value = msg.value()
            if self.fatal_after is not None and self.delivered >= self.fatal_after:
                self.fatal = True
            if self.fatal:
                on_delivery(FATAL, msg)
            elif self.fenced:
                on_delivery(KafkaError(KafkaError.PRODUCER_FENCED), msg)
            elif msg.topic() in self.refused:
                on_delivery(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED), msg)
            elif (code := self._error_for(value)) is not None:
                on_delivery(KafkaError(code), msg)
            elif value in self.fail_once:
                self.fail_once.discard(value)
                on_delivery(KafkaError(KafkaError._MSG_TIMED_OUT), msg)
            else:
                self.acked[value] += 1
                Broker.log.append((msg.topic(), value))
                self.delivered += 1
                on_delivery(None, msg)
        if not queued:
            time.sleep(timeout)
        return len(queued)


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[Broker]]:
    monkeypatch.setattr(publisher_module, "Producer", Broker)
    Broker.log, Broker.made = [], []
    yield Broker
    FakeProducer.last = None


def _records(topic: str, prefix: str, n: int, key: bytes = b"k") -> list[OutRecord]:
    return [OutRecord(topic, key, f"{prefix}{i}".encode()) for i in range(n)]


def _delivered(topic: str) -> list[bytes]:
    return [value for t, value in Broker.log if t == topic]


# --- item 4: a producer in librdkafka's fatal state ---------------------------------------


def test_a_fatal_producer_is_replaced_and_every_record_delivered_once_in_order(
    broker: type[Broker],
) -> None:
    """The first producer goes fatal after 30 deliveries, mid-stream: records it holds fail
    with _FATAL, and produce() on it raises _FATAL (publish must not raise, and the poll
    thread must not die). It used to hang: retries produced on the fatal producer again and
    again, tickets never completed."""
    pub = Publisher({}, retry_backoff_s=0.01, rebuild_interval_s=0.05)
    first = Broker.made[0]
    first.fatal_after = 30
    tickets, published = [], []
    try:
        for b in range(20):
            records = _records("preds", f"{b}-", 10)
            published += [r.value for r in records]
            ticket = Ticket()
            pub.publish(records, ticket)  # raises nothing, on a fatal producer too
            tickets.append(ticket)
            time.sleep(0.01)
        for ticket in tickets:
            assert settled(ticket, 5.0) and ticket.done, "a ticket never completed"
        assert first.fatal and len(Broker.made) >= 2 and pub.rebuilds >= 1
        assert pub.problem is None and pub._thread.is_alive()
        # Each record once, and in the order published (one key: Kafka must keep it).
        assert _delivered("preds") == published
    finally:
        assert pub.close(timeout_s=1.0) == 0


def test_the_review_reproduction_a_fatal_error_at_the_first_delivery(broker: type[Broker]) -> None:
    """sim_fatal.py of the review: the first record's delivery is fatal; a second publish
    meets produce() raising _FATAL. Both tickets complete on the replacement."""
    pub = Publisher({}, retry_backoff_s=0.01, rebuild_interval_s=0.05)
    Broker.made[0].fatal_after = 0
    first_ticket, second_ticket = Ticket(), Ticket()
    try:
        pub.publish([OutRecord("preds", b"k", b"v")], first_ticket)
        _wait_for(lambda: Broker.made[0].fatal or pub.rebuilds > 0, 2.0)
        pub.publish([OutRecord("preds", b"k", b"w")], second_ticket)
        assert settled(first_ticket, 3.0) and settled(second_ticket, 3.0)
        assert first_ticket.done and second_ticket.done
        assert _delivered("preds").count(b"w") == 1
    finally:
        pub.close(timeout_s=1.0)


# --- item 10: classified delivery errors ---------------------------------------------------


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (KafkaError._MSG_TIMED_OUT, Failure.RETRY),
        (KafkaError.NOT_ENOUGH_REPLICAS, Failure.RETRY),
        (KafkaError._PURGE_QUEUE, Failure.RETRY),
        (KafkaError.PRODUCER_FENCED, Failure.BROKEN),
        (KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, Failure.BROKEN),
        (KafkaError.TOPIC_AUTHORIZATION_FAILED, Failure.REFUSED),
        (KafkaError.MSG_SIZE_TOO_LARGE, Failure.PERMANENT),
        (KafkaError.INVALID_RECORD, Failure.PERMANENT),
        (KafkaError.RECORD_LIST_TOO_LARGE, Failure.PERMANENT),
        (KafkaError._INVALID_ARG, Failure.PERMANENT),
    ],
)
def test_delivery_errors_are_classified(code: int, expected: Failure) -> None:
    assert classify(KafkaError(code)) is expected


def test_a_size_refusal_is_the_records_only_when_it_is_too_large_alone() -> None:
    """The broker judges a whole record batch against max.message.bytes, and librdkafka gives
    every record of a refused batch the error: a record that fits alone is retried."""
    for code in (KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE):
        assert classify(KafkaError(code), fits_alone=True) is Failure.RETRY
        assert classify(KafkaError(code), fits_alone=False) is Failure.PERMANENT


def test_the_producer_batches_under_the_smallest_output_topic_limit() -> None:
    from stream_infer.io.clients import producer_batch_bytes

    assert producer_batch_bytes({}, {}) is None
    assert producer_batch_bytes({}, {"out": 1_048_588, "dlq": 2_000_000}) is None  # 1 MB fits
    assert producer_batch_bytes({}, {"out": 400, "dlq": 1_048_588}) == 400 - 128
    assert producer_batch_bytes({"batch.size": 100}, {"out": 400}) is None


def test_an_unknown_topic_is_retried_for_a_while_then_permanent() -> None:
    for code in (KafkaError._UNKNOWN_TOPIC, KafkaError.UNKNOWN_TOPIC_OR_PART):
        err = KafkaError(code)
        assert classify(err, unknown_for_s=5.0, unknown_topic_timeout_s=60.0) is Failure.RETRY
        assert classify(err, unknown_for_s=61.0, unknown_topic_timeout_s=60.0) is Failure.PERMANENT
    assert classify(KafkaError(KafkaError._FATAL, fatal=True)) is Failure.BROKEN
    # produce() raising an error nobody knows passes: the record never left, it never will.
    assert classify(KafkaError(KafkaError._NOT_IMPLEMENTED), at_produce=True) is Failure.PERMANENT


def _dead_letter(record: OutRecord, why: str) -> OutRecord | None:
    if record.topic == "dlq":
        return None
    return OutRecord("dlq", record.key, b"DL:" + record.value + b":" + why.encode())


def test_a_record_its_topic_refuses_for_good_becomes_a_dead_letter_under_the_same_ticket(
    broker: type[Broker],
) -> None:
    """INVALID_RECORD (e.g. a null key on a compacted topic) came back at every retry: the
    batch never completed and nothing said why. Now: one attempt, a dead letter keeps it."""
    retries: list[tuple[str, str]] = []
    pub = Publisher(
        {},
        retry_backoff_s=0.01,
        undeliverable=_dead_letter,
        on_retry=lambda t, e: retries.append((t, e)),
    )
    producer = Broker.made[0]
    producer.errors = {b"bad": KafkaError.INVALID_RECORD}
    ticket = Ticket()
    try:
        pub.publish([OutRecord("preds", b"k", v) for v in (b"a", b"bad", b"c")], ticket)
        assert settled(ticket, 2.0) and ticket.done
        time.sleep(0.1)  # ten back-offs: a retry loop would have produced it again
        assert producer.produced[b"bad"] == 1
        assert _delivered("preds") == [b"a", b"c"]
        (letter,) = _delivered("dlq")
        assert letter.startswith(b"DL:bad:topic 'preds' refused a 3-byte record for good")
        assert b"INVALID_RECORD" in letter
        assert retries == [("preds", "INVALID_RECORD")]
        assert pub.problem is None
    finally:
        assert pub.close(timeout_s=1.0) == 0


def test_a_dead_letter_refused_for_good_fails_its_ticket_and_the_health_check(
    broker: type[Broker],
) -> None:
    async def scenario() -> None:
        pub = Publisher({}, retry_backoff_s=0.01, undeliverable=_dead_letter)
        producer = Broker.made[0]
        # `huge`, and its dead letter too (the topic's max.message.bytes is lower still).
        producer.errors = {b"huge": KafkaError.MSG_SIZE_TOO_LARGE}
        producer.errors[b"DL:huge"] = KafkaError.MSG_SIZE_TOO_LARGE
        bad, good = Ticket(asyncio.get_running_loop()), Ticket(asyncio.get_running_loop())
        pub.publish([OutRecord("preds", b"k", b"huge")], bad)
        pub.publish([OutRecord("preds", b"k", b"fine")], good)
        with pytest.raises(DeliveryError, match="topic 'dlq' refused") as info:
            await asyncio.wait_for(bad.delivered(), 2.0)
        assert info.value.topic == "dlq"
        await asyncio.wait_for(good.delivered(), 2.0)  # the others go on
        assert pub.problem is not None and "MSG_SIZE_TOO_LARGE" in pub.problem
        assert pub.close(timeout_s=0.5) == 1  # said undelivered

    asyncio.run(scenario())


def test_a_topic_that_stays_unknown_is_dead_lettered_after_the_bound(
    broker: type[Broker],
) -> None:
    """A deleted output topic: UNKNOWN_TOPIC_OR_PART at every delivery, forever."""
    pub = Publisher(
        {}, retry_backoff_s=0.02, unknown_topic_timeout_s=0.3, undeliverable=_dead_letter
    )
    producer = Broker.made[0]
    producer.errors = {b"x": KafkaError.UNKNOWN_TOPIC_OR_PART}
    ticket = Ticket()
    started = time.monotonic()
    try:
        pub.publish([OutRecord("gone", None, b"x")], ticket)
        assert settled(ticket, 3.0) and ticket.done
        assert time.monotonic() - started >= 0.3  # retried while it may be being created
        assert producer.produced[b"x"] >= 3
        assert len(_delivered("dlq")) == 1
    finally:
        pub.close(timeout_s=1.0)


def test_the_oldest_unacknowledged_ticket_is_measured(broker: type[Broker]) -> None:
    pub = Publisher({}, retry_backoff_s=0.01, refused_backoff_s=0.2)
    producer = Broker.made[0]
    producer.refused = {"preds"}
    ticket = Ticket()
    try:
        assert pub.oldest_unacked_s == 0.0
        pub.publish([OutRecord("preds", None, b"p")], ticket)
        pub.publish([OutRecord("other", None, b"q")], Ticket())  # delivered: not counted
        time.sleep(0.3)
        assert 0.3 <= pub.oldest_unacked_s < 2.0
        producer.refused.clear()
        assert settled(ticket, 2.0)
        assert pub.oldest_unacked_s == 0.0
    finally:
        pub.close(timeout_s=1.0)


# --- a full local queue ------------------------------------------------------------------


def test_a_full_queue_never_blocks_publish_nor_deadlocks_the_poll_thread(
    broker: type[Broker],
) -> None:
    """librdkafka's queue holds 10 records. 300 records are published at once (publish used to
    sleep until the poll thread drained the queue), and every one fails its first delivery,
    so the poll thread produces 300 retries into the full queue itself: it used to sleep on
    BufferError waiting for a poll() only it could make, forever."""
    pub = Publisher({}, retry_backoff_s=0.01)
    producer = Broker.made[0]
    producer.max_queue = 10
    records = _records("preds", "r", 300)
    producer.fail_once = {r.value for r in records}
    ticket = Ticket()
    try:
        started = time.monotonic()
        pub.publish(records, ticket)
        assert time.monotonic() - started < 0.05, "publish waited for the producer"
        assert settled(ticket, 10.0) and ticket.done, "the poll thread is stuck"
        assert _delivered("preds") == [r.value for r in records]
        assert pub._thread.is_alive()
    finally:
        assert pub.close(timeout_s=1.0) == 0


# --- item 11: per-topic order ----------------------------------------------------------------


def test_records_published_while_a_topic_is_refused_go_out_after_the_refused_ones(
    broker: type[Broker],
) -> None:
    """The refused records are retried every refused_backoff_s; a record published once the
    permission is granted but before that retry used to go straight out, ahead of them."""
    pub = Publisher({}, retry_backoff_s=0.01, refused_backoff_s=0.3)
    producer = Broker.made[0]
    producer.refused = {"preds"}
    first, later = Ticket(), Ticket()
    try:
        pub.publish(_records("preds", "a", 3), first)
        _wait_for(lambda: pub.access.active, 2.0)
        producer.refused.clear()  # granted
        pub.publish(_records("preds", "b", 3), later)
        assert settled(first, 3.0) and settled(later, 3.0)
        assert _delivered("preds") == [b"a0", b"a1", b"a2", b"b0", b"b1", b"b2"]
    finally:
        pub.close(timeout_s=1.0)


def test_a_fenced_producer_with_records_published_during_its_replacement_keeps_the_order(
    broker: type[Broker],
) -> None:
    """Fenced (not fatal: produce() still accepts): what it holds comes back, records keep
    arriving meanwhile; the new producer gets them all in the order published."""
    pub = Publisher({}, retry_backoff_s=0.01, rebuild_interval_s=0.1)
    first = Broker.made[0]
    first.fenced = True
    published: list[bytes] = []
    tickets = []
    try:
        for b in range(10):
            records = _records("preds", f"{b}-", 5)
            published += [r.value for r in records]
            tickets.append(Ticket())
            pub.publish(records, tickets[-1])
            time.sleep(0.03)  # some before the replacement, some during, some after
        for ticket in tickets:
            assert settled(ticket, 5.0) and ticket.done
        assert _delivered("preds") == published
        assert pub.rebuilds >= 1
    finally:
        pub.close(timeout_s=1.0)


def test_a_refused_topic_does_not_hold_up_other_topics(broker: type[Broker]) -> None:
    pub = Publisher({}, retry_backoff_s=0.01, refused_backoff_s=5.0)
    producer = Broker.made[0]
    producer.refused = {"acks"}
    ack, prediction = Ticket(), Ticket()
    try:
        pub.publish([OutRecord("acks", None, b"ack")], ack)
        _wait_for(lambda: pub.access.active, 2.0)
        pub.publish([OutRecord("preds", None, b"p")], prediction)
        assert settled(prediction, 1.0)
        assert not settled(ack, 0)
    finally:
        pub.close(timeout_s=0.2)


def test_records_that_come_back_wait_for_the_topics_records_still_inside(
    broker: type[Broker],
) -> None:
    """Two records of a topic in the producer; the first fails, the second is still inside:
    the failed one is not produced again before the second has come back (delivered)."""
    pub = Publisher({}, retry_backoff_s=0.0)
    producer = Broker.made[0]
    producer.paused = True
    ticket = Ticket()
    with pub._lock:  # both produced, the second not yet reported
        pub._submit(OutRecord("t", None, b"one"), ticket)
        pub._submit(OutRecord("t", None, b"two"), ticket)
    state = pub._topics["t"]
    ticket._expect(2)
    with producer._lock:
        (one, one_cb), rest = producer._queue[0], producer._queue[1:]
        producer._queue = []
    one_cb(KafkaError(KafkaError._MSG_TIMED_OUT), one)  # the first came back
    with pub._lock:
        pub._release(time.monotonic() + 1)
    assert producer.produced[b"one"] == 1, "produced again while `two` was still inside"
    assert state.produced - state.returned == 1
    with producer._lock:
        producer._queue = rest + producer._queue
    producer.paused = False
    assert settled(ticket, 2.0)
    assert _delivered("t") == [b"two", b"one"]  # (a timeout's gap: see the module docstring)
    pub.close(timeout_s=0.5)


def test_publish_from_a_delivery_callback_thread_meets_no_lock_it_holds(
    broker: type[Broker],
) -> None:
    """A dead letter is produced from inside a delivery callback (the poll thread holds the
    publisher's lock there): no deadlock with a publish on another thread."""
    pub = Publisher({}, retry_backoff_s=0.01, undeliverable=_dead_letter)
    producer = Broker.made[0]
    producer.errors = {f"bad{i}".encode(): KafkaError.INVALID_RECORD for i in range(50)}
    tickets = [Ticket() for _ in range(20)]
    try:
        for ticket in tickets:
            pub.publish(_records("preds", "bad", 50), ticket)
        for ticket in tickets:
            assert settled(ticket, 5.0) and ticket.done
        assert len(_delivered("dlq")) == 1000
    finally:
        pub.close(timeout_s=1.0)
