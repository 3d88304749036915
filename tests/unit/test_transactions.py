"""exactly_once without a broker: the TransactionalPublisher against a producer that fails the
way librdkafka's transactional producer fails, and the BatchSource's rewind bookkeeping against a
consumer that hands out prepared chunks.

The fake producer keeps librdkafka's rules that the publisher relies on: produce() outside a
transaction is refused (_STATE); delivery reports are served by poll() and by
commit_transaction() (which flushes); a record refused for good puts the transaction in the
abortable state (send_offsets and commit then raise with ``txn_requires_abort``); abort purges
what is not yet reported (_PURGE_QUEUE reports on the next poll) and discards the rest; after a
fatal error every call raises it again. Only committed records and offsets count as visible.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from stream_infer.core.events import OutRecord
from stream_infer.errors import BrokerError, DeliveryError
from stream_infer.io.clients import RECORD_BATCH_OVERHEAD_BYTES
from stream_infer.io.publisher import Ticket
from stream_infer.io.source import BatchSource, SourceBatch
from stream_infer.io.transactions import TransactionalPublisher
from tests.tickets import settled
from tests.unit.test_publisher import FakeMessage, _wait_for

Delivery = Callable[[KafkaError | None, Any], None]
TXN_ID = "stream-infer.t.w1"
GROUP = object()  # stands for the consumer's group metadata (opaque to the publisher)


def retriable(what: str = "timed out") -> KafkaError:
    return KafkaError(KafkaError._TIMED_OUT, what, retriable=True)


def abortable(code: int = KafkaError.ILLEGAL_GENERATION) -> KafkaError:
    return KafkaError(code, "the group moved on", txn_requires_abort=True)


def fatal() -> KafkaError:
    return KafkaError(KafkaError.PRODUCER_FENCED, "fenced by a newer producer", fatal=True)


def _transport() -> KafkaError:
    return KafkaError(KafkaError._TRANSPORT, "Failed to add offsets to transaction: transport")


def _state(what: str) -> KafkaException:
    return KafkaException(KafkaError(KafkaError._STATE, f"Operation not valid in state: {what}"))


class TxnProducer:
    """A transactional producer, as far as the TransactionalPublisher uses it.

    - ``fail``: call name -> errors its next calls raise (one per call); an abortable one also
      puts the transaction in the abortable state, a fatal one the producer in the fatal state;
    - ``refused``: value prefix -> the error (not retriable) its delivery report carries;
    - ``max_queue``: produce() raises BufferError past this many records not yet reported;
    - ``gate``: begin_transaction() waits for it (bounded), to let a test queue batches;
    - ``slow_s``: a scripted error comes this long after the call, as a timed-out call's does.

    ``calls`` is the log of calls in order (a test may append its own events to it);
    ``produced`` every record produce() accepted; ``visible`` the committed records and
    ``offsets`` the committed offsets (with the group metadata they were sent with).
    """

    def __init__(self, log: list[str] | None = None) -> None:
        self.calls: list[str] = log if log is not None else []
        self.fail: dict[str, list[KafkaError]] = {}
        self.refused: dict[bytes, KafkaError] = {}
        self.max_queue: int | None = None
        self.gate: threading.Event | None = None
        self.slow_s = 0.0
        self.produced: list[tuple[str, bytes | None, bytes]] = []
        self.visible: list[bytes] = []
        self.offsets: list[tuple[list[tuple[str, int, int]], object]] = []
        self._queue: list[tuple[FakeMessage, Delivery]] = []
        self._purged: list[tuple[FakeMessage, Delivery]] = []
        self._in_txn = False
        self._txn_records: list[bytes] = []
        self._txn_offsets: list[tuple[list[tuple[str, int, int]], object]] = []
        self._txn_error: KafkaError | None = None
        self._fatal: KafkaError | None = None

    def _enter(self, name: str) -> None:
        self.calls.append(name)
        if self._fatal is not None:
            raise KafkaException(self._fatal)
        errors = self.fail.get(name)
        if errors:
            err = errors.pop(0)
            time.sleep(self.slow_s)
            if err.fatal():
                self._fatal = err
            elif err.txn_requires_abort() and self._in_txn:
                self._txn_error = err
            raise KafkaException(err)

    def _abortable_state(self) -> None:
        if self._txn_error is not None:
            err = self._txn_error
            raise KafkaException(KafkaError(err.code(), err.str(), txn_requires_abort=True))

    def init_transactions(self, timeout: float) -> None:
        self._enter("init_transactions")

    def begin_transaction(self) -> None:
        if self.gate is not None:
            assert self.gate.wait(5.0), "the test never opened the gate"
        self._enter("begin_transaction")
        if self._in_txn:
            raise _state("InTransaction")
        self._in_txn = True

    def produce(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        on_delivery: Delivery | None = None,
    ) -> None:
        if self._fatal is not None:
            raise KafkaException(self._fatal)
        if not self._in_txn:
            raise _state("Ready (produce outside a transaction)")
        if self.max_queue is not None and len(self._queue) >= self.max_queue:
            self.calls.append("produce:full")
            raise BufferError("Local: Queue full")
        self._enter("produce")
        assert on_delivery is not None
        self.produced.append((topic, key, value))
        self._queue.append((FakeMessage(topic, key, value), on_delivery))

    def _refusal(self, value: bytes) -> KafkaError | None:
        return next((e for p, e in self.refused.items() if value.startswith(p)), None)

    def _report(self) -> int:
        purged, self._purged = self._purged, []
        for msg, on_delivery in purged:
            on_delivery(KafkaError(KafkaError._PURGE_QUEUE), msg)
        queued, self._queue = self._queue, []
        for msg, on_delivery in queued:
            err = self._refusal(msg.value())
            if err is not None:
                if self._txn_error is None:
                    self._txn_error = err
                on_delivery(err, msg)
            else:
                self._txn_records.append(msg.value())
                on_delivery(None, msg)
        return len(purged) + len(queued)

    def poll(self, timeout: float = -1) -> int:
        self.calls.append("poll")
        return self._report()

    def flush(self, timeout: float = -1) -> int:
        self.calls.append("flush")
        self._report()
        return 0

    def send_offsets_to_transaction(
        self, positions: list[TopicPartition], group: object, timeout: float
    ) -> None:
        self._enter("send_offsets_to_transaction")
        if not self._in_txn:
            raise _state("Ready (send_offsets outside a transaction)")
        self._abortable_state()
        sent = sorted((tp.topic, tp.partition, tp.offset) for tp in positions)
        self._txn_offsets.append((sent, group))

    def commit_transaction(self, timeout: float = -1) -> None:
        self._enter("commit_transaction")
        if not self._in_txn:
            raise _state("Ready (commit outside a transaction)")
        self._report()  # commit flushes: the reports are served inside it
        self._abortable_state()
        self.visible.extend(self._txn_records)
        self.offsets.extend(self._txn_offsets)
        self._end()

    def abort_transaction(self, timeout: float = -1) -> None:
        self._enter("abort_transaction")
        if not self._in_txn:
            raise _state("Ready (abort outside a transaction)")
        self._purged.extend(self._queue)
        self._queue = []
        self._end()

    def _end(self) -> None:
        self._in_txn = False
        self._txn_records, self._txn_offsets, self._txn_error = [], [], None


class FakeSource:
    """What the publisher needs of the batch source; appends its calls to the shared log."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.failure: str | None = None
        self.rewinds = 0
        self.committed_batches: list[int] = []

    def committed(self, batch: SourceBatch) -> None:
        self.committed_batches.append(batch.seq)
        self.log.append(f"source.committed:{batch.seq}")

    def rewind(self) -> None:
        self.rewinds += 1
        self.log.append("source.rewind")


class Harness:
    """A started TransactionalPublisher over a TxnProducer and a FakeSource, one log for all."""

    def __init__(self, **kwargs: Any) -> None:
        self.log: list[str] = []
        self.producer = TxnProducer(self.log)
        self.source = FakeSource(self.log)
        self.outcomes: list[str] = []
        self.stages: list[str] = []
        self.publisher = TransactionalPublisher(
            {"transactional.id": TXN_ID},
            transaction_timeout_s=5.0,
            on_stage=lambda stage, seconds: self.stages.append(stage),
            on_outcome=self.outcomes.append,
            producer=self.producer,
            **kwargs,
        )

    def start(self) -> Harness:
        self.publisher.init()
        self.publisher.start(self.source)
        return self

    def submit(self, batch: SourceBatch, records: list[OutRecord]) -> Ticket:
        ticket = Ticket()
        seq = batch.seq
        ticket._on_settled = lambda _: self.log.append(f"settled:{seq}")
        self.publisher.submit(batch, records, ticket, lambda: self.log.append(f"after:{seq}"))
        return ticket

    def events(self) -> list[str]:
        """The log without polls (their number is the publisher's business)."""
        return [e for e in self.log if e != "poll"]


@pytest.fixture
def make() -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def factory(**kwargs: Any) -> Harness:
        harness = Harness(**kwargs)
        made.append(harness)
        return harness

    yield factory
    for harness in made:
        if harness.producer.gate is not None:
            harness.producer.gate.set()
        harness.publisher.close(timeout_s=5.0)
        assert not harness.publisher.alive


def _batch(
    seq: int, epoch: int = 0, offsets: dict[tuple[str, int], int] | None = None
) -> SourceBatch:
    return SourceBatch([], offsets or {("in", 0): 10 + seq}, seq=seq, epoch=epoch, group=GROUP)


def _records(prefix: str, n: int, topic: str = "out") -> list[OutRecord]:
    return [OutRecord(topic, b"k", f"{prefix}{i}".encode()) for i in range(n)]


def _msg(partition: int, offset: int, topic: str = "in") -> Message:
    """An input record, as consume() returns it."""
    return Message(topic=topic, partition=partition, offset=offset, value=b"{}")


# --- 1. a batch is one transaction --------------------------------------------------------------


def test_a_batch_is_records_then_offsets_then_commit_and_the_source_learns_before_it_settles(
    make: Callable[..., Harness],
) -> None:
    h = make().start()
    batch = _batch(0, offsets={("in", 0): 10, ("labels", 1): 3})
    records = _records("p", 3)
    ticket = h.submit(batch, records)
    assert settled(ticket, 5.0)
    assert ticket.done and not ticket.rewound and ticket.error is None
    _wait_for(lambda: "settled:0" in h.log)  # the event is set before the settle callback runs
    assert h.events() == [
        "init_transactions",
        "begin_transaction",
        "produce",
        "produce",
        "produce",
        "send_offsets_to_transaction",
        "commit_transaction",
        "source.committed:0",
        "after:0",
        "settled:0",
    ]
    assert h.producer.visible == [r.value for r in records]
    # The input offsets as TopicPartitions, with the group metadata the batch carries (KIP-447).
    assert h.producer.offsets == [([("in", 0, 10), ("labels", 1, 3)], GROUP)]
    assert h.producer.offsets[0][1] is batch.group
    assert h.outcomes == ["committed"]
    assert h.stages == ["begin", "produce", "send_offsets", "commit"]
    assert (h.publisher.committed, h.publisher.aborted) == (1, 0)
    _wait_for(lambda: h.publisher.oldest_unacked_s == 0.0)


def test_batches_commit_in_the_order_they_were_submitted(make: Callable[..., Harness]) -> None:
    h = make().start()
    tickets = [h.submit(_batch(i), _records(f"b{i}-", 2)) for i in range(4)]
    assert all(settled(t, 5.0) for t in tickets)
    assert h.producer.visible == [r.value for i in range(4) for r in _records(f"b{i}-", 2)]
    assert [o for o, _ in h.producer.offsets] == [[("in", 0, 10 + i)] for i in range(4)]
    assert h.source.committed_batches == [0, 1, 2, 3]
    assert [e for e in h.log if e.startswith("after:")] == [f"after:{i}" for i in range(4)]


def test_the_open_transaction_counts_as_unacknowledged(make: Callable[..., Harness]) -> None:
    h = make()
    h.producer.gate = threading.Event()
    h.start()
    ticket = h.submit(_batch(0), _records("p", 1))
    _wait_for(lambda: h.publisher.oldest_unacked_s > 0.0)
    assert not ticket.done
    h.producer.gate.set()
    assert settled(ticket, 5.0)
    _wait_for(lambda: h.publisher.oldest_unacked_s == 0.0)


@pytest.mark.parametrize("call", ["send_offsets_to_transaction", "commit_transaction"])
def test_a_retriable_error_is_the_same_call_again(make: Callable[..., Harness], call: str) -> None:
    h = make()
    h.producer.fail[call] = [retriable(), retriable()]
    h.start()
    ticket = h.submit(_batch(0), _records("p", 2))
    assert settled(ticket, 5.0)
    assert ticket.done and not ticket.rewound
    assert h.log.count(call) == 3
    assert h.log.count("begin_transaction") == 1
    assert "abort_transaction" not in h.log
    assert h.producer.visible == [b"p0", b"p1"]
    assert h.outcomes == ["committed"]


# --- abortable errors: abort, skip the epoch, rewind ---------------------------------------------


def test_a_transport_error_on_send_offsets_aborts_and_reads_the_batch_again(
    make: Callable[..., Harness],
) -> None:
    """The broker leading the transaction coordinator killed (CI's 3-node fault under
    transactions): send_offsets raised _TRANSPORT, neither fatal, abortable nor retriable, and
    the worker exited. Nothing is committed before the commit: abort, rewind, serve again."""
    h = make()
    h.producer.fail["send_offsets_to_transaction"] = [
        KafkaError(
            KafkaError._TRANSPORT, "Failed to add offsets to transaction: Broker transport failure"
        )
    ]
    h.start()
    first = h.submit(_batch(0, epoch=0), _records("a", 2))
    assert settled(first, 5.0)
    assert first.rewound and first.error is None
    assert h.source.rewinds == 1
    again = h.submit(_batch(0, epoch=1), _records("a", 2))
    assert settled(again, 5.0) and again.done and again.error is None
    assert h.producer.visible == [b"a0", b"a1"]
    assert h.outcomes == ["aborted", "committed"]


def test_an_abortable_error_aborts_skips_the_epoch_and_rewinds(
    make: Callable[..., Harness],
) -> None:
    h = make()
    h.producer.fail["send_offsets_to_transaction"] = [abortable()]
    h.producer.gate = threading.Event()  # all three queued before the first begins
    h.start()
    first = h.submit(_batch(0, epoch=0), _records("a", 2))
    second = h.submit(_batch(1, epoch=0), _records("b", 2))  # read before the rewind
    third = h.submit(_batch(2, epoch=1), _records("c", 2))  # read again after it
    h.producer.gate.set()
    assert all(settled(t, 5.0) for t in (first, second, third))
    assert first.rewound and first.error is None
    assert second.rewound and second.error is None
    assert third.done and not third.rewound
    assert h.source.rewinds == 1
    assert h.log.index("abort_transaction") < h.log.index("source.rewind")
    # The skipped batch never began a transaction: two begins, the aborted one's and the third's.
    assert h.log.count("begin_transaction") == 2
    assert [v for _, _, v in h.producer.produced] == [b"a0", b"a1", b"c0", b"c1"]
    assert h.producer.visible == [b"c0", b"c1"]
    assert h.producer.offsets == [([("in", 0, 12)], GROUP)]
    assert h.source.committed_batches == [2]
    assert [e for e in h.log if e.startswith("after:")] == ["after:2"]
    assert h.outcomes == ["aborted", "skipped", "committed"]
    assert (h.publisher.committed, h.publisher.aborted) == (1, 1)
    assert "abort" in h.stages


def test_a_refused_delivery_aborts_the_transaction(make: Callable[..., Harness]) -> None:
    """A record refused for good inside a transaction: the transaction's next call (send_offsets,
    or commit) raises the error with txn_requires_abort, as librdkafka's do."""
    h = make()
    h.producer.refused[b"bad"] = KafkaError(KafkaError.INVALID_RECORD, "invalid record")
    h.start()
    ticket = h.submit(_batch(0), [*_records("ok", 1), OutRecord("out", b"k", b"bad")])
    assert settled(ticket, 5.0)
    assert ticket.rewound
    assert h.producer.visible == []
    assert h.source.rewinds == 1
    assert h.outcomes == ["aborted"]


def test_three_aborts_in_a_row_fail_the_batch(make: Callable[..., Harness]) -> None:
    h = make()
    timed_out = KafkaError._MSG_TIMED_OUT
    h.producer.fail["commit_transaction"] = [abortable(timed_out) for _ in range(3)]
    h.start()
    tickets = []
    for epoch in range(3):  # each served again after the rewind before it
        ticket = h.submit(_batch(epoch, epoch=epoch), _records("p", 1))
        assert settled(ticket, 5.0)
        tickets.append(ticket)
    assert [t.rewound for t in tickets] == [True, True, False]
    last = tickets[-1]
    assert isinstance(last.error, DeliveryError)
    assert "3 transactions in a row aborted" in str(last.error)
    assert "_MSG_TIMED_OUT" in str(last.error)
    assert h.source.rewinds == 2  # the failed batch is not rewound: the worker stops
    assert h.outcomes == ["aborted"] * 3
    assert not any(e.startswith("after:") for e in h.log)
    assert h.producer.visible == []
    assert h.publisher.alive  # a failed batch is not a dead producer
    assert h.publisher.problem is None


def test_aborts_because_the_group_moved_on_are_not_counted(
    make: Callable[..., Harness],
) -> None:
    """Rebalances in a row (each a new generation or member epoch, KIP-848's on every
    assignment change) abort the batch in flight each time: no poison batch, no failure."""
    h = make()
    moved = [KafkaError.ILLEGAL_GENERATION, KafkaError.UNKNOWN_MEMBER_ID]
    moved += [KafkaError.STALE_MEMBER_EPOCH, KafkaError.REBALANCE_IN_PROGRESS]
    h.producer.fail["send_offsets_to_transaction"] = [abortable(code) for code in moved]
    h.start()
    tickets = []
    for epoch in range(len(moved) + 1):
        ticket = h.submit(_batch(epoch, epoch=epoch), _records("p", 1))
        assert settled(ticket, 5.0)
        tickets.append(ticket)
    assert [t.rewound for t in tickets] == [True] * len(moved) + [False]
    assert all(t.error is None for t in tickets)
    assert h.outcomes == ["aborted"] * len(moved) + ["committed"]


def test_a_commit_between_aborts_starts_the_count_again(make: Callable[..., Harness]) -> None:
    h = make()
    # commits: batch 0 aborts, 1 commits, 2 and 3 abort, 4 commits.
    h.producer.fail["commit_transaction"] = [abortable()]
    h.start()
    plan = [(0, 0, True), (1, 1, False), (2, 1, True), (3, 2, True), (4, 3, False)]
    for seq, epoch, aborts in plan:
        if aborts and seq > 0:
            h.producer.fail["commit_transaction"] = [abortable()]
        ticket = h.submit(_batch(seq, epoch=epoch), _records(f"b{seq}-", 1))
        assert settled(ticket, 5.0)
        assert ticket.error is None, f"batch {seq} failed: {ticket.error}"
        assert ticket.rewound == aborts
    assert h.producer.visible == [b"b1-0", b"b4-0"]
    assert h.source.rewinds == 3


def test_a_batch_after_a_failed_one_is_skipped(make: Callable[..., Harness]) -> None:
    h = make().start()
    h.source.failure = "batch 0 failed"
    ticket = h.submit(_batch(1, epoch=0), _records("p", 1))
    assert settled(ticket, 5.0)
    assert ticket.rewound
    assert "begin_transaction" not in h.log
    assert h.outcomes == ["skipped"]


# --- fatal errors: the thread stops ---------------------------------------------------------------


@pytest.mark.parametrize(
    "call", ["begin_transaction", "produce", "send_offsets_to_transaction", "commit_transaction"]
)
def test_a_fatal_error_fails_the_batch_and_everything_queued_and_stops(
    make: Callable[..., Harness], call: str
) -> None:
    h = make()
    h.producer.fail[call] = [fatal()]
    h.producer.gate = threading.Event()
    h.start()
    first = h.submit(_batch(0), _records("a", 2))
    queued = [h.submit(_batch(i), _records(f"q{i}-", 1)) for i in (1, 2)]
    h.producer.gate.set()
    assert all(settled(t, 5.0) for t in (first, *queued))
    for ticket in (first, *queued):
        assert isinstance(ticket.error, DeliveryError) and not ticket.rewound
    _wait_for(lambda: not h.publisher.alive)
    problem = h.publisher.problem
    assert problem is not None
    assert "PRODUCER_FENCED" in problem or "fenced by a newer producer" in problem
    assert "abort_transaction" not in h.log  # a fenced producer cannot abort
    assert h.source.rewinds == 0
    assert h.producer.visible == []
    assert not any(e.startswith("after:") for e in h.log)


@pytest.mark.parametrize(
    ("call", "first"),
    [
        ("commit_transaction", "abortable"),
        # the coordinator's broker gone: send_offsets _TRANSPORT (aborted), then the abort too
        ("send_offsets_to_transaction", "transport"),
    ],
)
def test_an_abort_that_fails_is_fatal(make: Callable[..., Harness], call: str, first: str) -> None:
    h = make()
    error = abortable if first == "abortable" else _transport
    h.producer.fail[call] = [error()]
    h.producer.fail["abort_transaction"] = [error()]
    h.start()
    ticket = h.submit(_batch(0), _records("p", 1))
    assert settled(ticket, 5.0)
    assert isinstance(ticket.error, DeliveryError)
    _wait_for(lambda: not h.publisher.alive)
    assert h.publisher.problem is not None and "abort" in h.publisher.problem
    assert h.source.rewinds == 0 and h.producer.visible == []


def test_a_batch_submitted_after_a_fatal_error_fails_too(make: Callable[..., Harness]) -> None:
    h = make()
    h.producer.fail["commit_transaction"] = [fatal()]
    h.start()
    first = h.submit(_batch(0), _records("a", 1))
    assert settled(first, 5.0) and first.error is not None
    _wait_for(lambda: not h.publisher.alive)
    late = h.submit(_batch(1), _records("b", 1))
    assert settled(late, 1.0), "a batch submitted after the stop never settles"


# --- producing: a full queue, records no topic can take ----------------------------------------


def test_a_full_queue_is_polled_and_every_record_produced_once_in_order(
    make: Callable[..., Harness],
) -> None:
    h = make()
    h.producer.max_queue = 2
    h.start()
    records = _records("p", 7)
    ticket = h.submit(_batch(0), records)
    assert settled(ticket, 5.0)
    assert ticket.done and not ticket.rewound
    assert "produce:full" in h.log
    full = h.log.index("produce:full")
    assert h.log[full + 1] == "poll"  # drained by a poll, then produced again
    assert h.producer.produced == [("out", b"k", r.value) for r in records]
    assert h.producer.visible == [r.value for r in records]
    assert "abort_transaction" not in h.log


def test_a_record_over_its_topics_limit_becomes_its_dead_letter_before_it_is_produced(
    make: Callable[..., Harness],
) -> None:
    letters: list[tuple[OutRecord, str]] = []

    def undeliverable(record: OutRecord, why: str) -> OutRecord:
        letters.append((record, why))
        return OutRecord("dlq", record.key, b"dead:" + record.value[:4])

    limit = 1000
    h = make(undeliverable=undeliverable, max_message_bytes={"out": limit})
    h.start()
    room = limit - RECORD_BATCH_OVERHEAD_BYTES - len(b"k")  # the value bytes that fit exactly
    fits = OutRecord("out", b"k", b"x" * room)
    big = OutRecord("out", b"k", b"y" * (room + 1))  # 1 byte over
    ticket = h.submit(_batch(0), [fits, big])
    assert settled(ticket, 5.0)
    assert ticket.done and not ticket.rewound
    assert [r for r, _ in letters] == [big]
    assert f"over out's max.message.bytes {limit}" in letters[0][1]
    assert h.producer.produced == [("out", b"k", fits.value), ("dlq", b"k", b"dead:yyyy")]
    assert "abort_transaction" not in h.log  # foreseen: never an aborted transaction


def test_a_record_no_topic_can_take_and_no_dead_letter_is_fatal(
    make: Callable[..., Harness],
) -> None:
    h = make(undeliverable=lambda r, why: None, max_message_bytes={"out": 10})
    h.start()
    ticket = h.submit(_batch(0), _records("too-large-", 1))
    assert settled(ticket, 5.0)
    assert isinstance(ticket.error, DeliveryError)
    _wait_for(lambda: not h.publisher.alive)
    assert h.publisher.problem is not None and "has no dead letter" in h.publisher.problem
    assert "begin_transaction" not in h.log


def _refused_then_served_again(
    h: Harness, first: list[OutRecord], again: list[OutRecord]
) -> tuple[Ticket, Ticket]:
    h.producer.refused[b"bad"] = KafkaError(KafkaError.INVALID_RECORD, "record refused")
    h.start()
    aborted = h.submit(_batch(0, epoch=0), first)
    assert settled(aborted, 5.0)
    assert aborted.rewound and h.source.rewinds == 1
    served = h.submit(_batch(1, epoch=1), again)
    assert settled(served, 5.0)
    return aborted, served


def _letters() -> tuple[list[tuple[OutRecord, str]], Callable[[OutRecord, str], OutRecord]]:
    letters: list[tuple[OutRecord, str]] = []

    def undeliverable(record: OutRecord, why: str) -> OutRecord:
        letters.append((record, why))
        return OutRecord("dlq", record.key, b"dead:" + record.value)

    return letters, undeliverable


def test_a_record_refused_in_an_aborted_attempt_is_its_dead_letter_when_served_again(
    make: Callable[..., Harness],
) -> None:
    """Served again with the same bytes: the publisher keys what it refused by (topic, key,
    value)."""
    letters, undeliverable = _letters()
    h = make(undeliverable=undeliverable)
    records = [OutRecord("out", b"k", b"good"), OutRecord("out", b"k", b"bad")]
    _, served = _refused_then_served_again(h, records, list(records))
    assert served.done and not served.rewound
    assert [(r.value, "INVALID_RECORD" in why) for r, why in letters] == [(b"bad", True)]
    assert h.producer.visible == [b"good", b"dead:bad"]
    assert [v for _, _, v in h.producer.produced].count(b"bad") == 1
    assert h.outcomes == ["aborted", "committed"]


def test_a_refused_prediction_served_again_with_other_bytes_is_found_by_its_input(
    make: Callable[..., Harness],
) -> None:
    """A prediction served again carries a new served_at: it is found again by its output
    topic and the input record it was made from (read again: another object, same position)."""
    letters, undeliverable = _letters()
    h = make(undeliverable=undeliverable)
    source = _msg(0, 10)
    again = _msg(0, 10)
    first = [OutRecord("out", b"k", b'bad{"served_at":1.0}', source)]
    second = [OutRecord("out", b"k", b'bad{"served_at":2.0}', again)]
    _, served = _refused_then_served_again(h, first, second)
    assert served.done and not served.rewound
    assert [r.value for r, _ in letters] == [b'bad{"served_at":2.0}']
    assert h.producer.visible == [b'dead:bad{"served_at":2.0}']
    assert h.outcomes == ["aborted", "committed"]


def _refused_once_then_gone(
    make: Callable[..., Harness], error: KafkaError, offset_again: int
) -> tuple[list[tuple[OutRecord, str]], Harness, Ticket]:
    """A record made from input offset 10 refused with ``error`` (its transaction aborts),
    then whatever refused it is gone, and a record with the same bytes made from
    ``offset_again`` is served."""
    letters, undeliverable = _letters()
    h = make(undeliverable=undeliverable)
    h.producer.refused[b"bad"] = error
    h.start()
    aborted = h.submit(_batch(0, epoch=0), [OutRecord("out", b"k", b"bad", _msg(0, 10))])
    assert settled(aborted, 5.0) and aborted.rewound
    h.producer.refused.clear()
    again = [OutRecord("out", b"k", b"bad", _msg(0, offset_again))]
    served = h.submit(_batch(1, epoch=1), again)
    assert settled(served, 5.0) and served.done and not served.rewound
    return letters, h, served


def test_a_refused_record_of_another_input_position_is_produced_again(
    make: Callable[..., Harness],
) -> None:
    """The refusal is remembered for the input record it was made from, not for its
    neighbours: the same bytes from another input offset are no dead letter."""
    error = KafkaError(KafkaError.INVALID_RECORD, "record refused")
    letters, h, _ = _refused_once_then_gone(make, error, offset_again=11)
    assert letters == []
    assert h.producer.visible == [b"bad"]


def test_only_the_refused_one_of_two_records_from_one_input_is_its_dead_letter(
    make: Callable[..., Harness],
) -> None:
    letters, undeliverable = _letters()
    h = make(undeliverable=undeliverable)

    def made(served_at: float) -> list[OutRecord]:
        event = _msg(0, 10)
        return [
            OutRecord("out", b"k", f'good{{"model":"a","at":{served_at}}}'.encode(), event),
            OutRecord("out", b"k", f'bad{{"model":"b","at":{served_at}}}'.encode(), event),
        ]

    _, served = _refused_then_served_again(h, made(1.0), made(2.0))
    assert served.done and not served.rewound
    assert [r.value for r, _ in letters] == [b'bad{"model":"b","at":2.0}']
    assert b'good{"model":"a","at":2.0}' in h.producer.visible


@pytest.mark.parametrize(
    "code",
    [
        KafkaError._MSG_TIMED_OUT,
        KafkaError.NOT_ENOUGH_REPLICAS,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
    ],
)
def test_a_passing_delivery_error_aborts_and_the_record_is_produced_again_as_is(
    make: Callable[..., Harness], code: int
) -> None:
    """A delivery report's error carries no retriable flag (confluent-kafka builds it from the
    code alone): a leader gone past the timeout, too few replicas or a missing Write ACL must
    not turn predictions into dead letters; the transaction is aborted and served again."""
    letters, h, _ = _refused_once_then_gone(make, KafkaError(code, "passing"), offset_again=10)
    assert letters == []
    assert h.producer.visible == [b"bad"]


def test_a_size_refusal_of_a_record_within_the_known_limit_fails_the_batch(
    make: Callable[..., Harness],
) -> None:
    """Within the topic's max.message.bytes read at start, a size refusal is its batch's: the
    limit was lowered since and every batch would be refused. No dead letter (the record
    fits): the batch fails, and the restart fits the producer's batches to the new limit."""
    letters, undeliverable = _letters()
    h = make(undeliverable=undeliverable, max_message_bytes={"out": 1_000_000})
    h.producer.refused[b"bad"] = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "too large")
    h.start()
    ticket = h.submit(_batch(0, epoch=0), [OutRecord("out", b"k", b"bad", _msg(0, 5))])
    assert settled(ticket, 5.0)
    assert isinstance(ticket.error, DeliveryError)
    assert "max.message.bytes is lower than when this worker started" in str(ticket.error)
    assert letters == []
    assert h.producer.visible == []
    assert h.outcomes == ["aborted"]


def test_a_batch_submitted_after_close_is_rewound_not_lost(make: Callable[..., Harness]) -> None:
    h = make().start()
    h.publisher.close(timeout_s=5.0)
    ticket = h.submit(_batch(0), _records("late-", 1))
    assert settled(ticket, 1.0) and ticket.rewound
    assert h.producer.visible == []


def test_aborts_in_a_row_show_in_the_age_of_the_uncommitted_attempt(
    make: Callable[..., Harness],
) -> None:
    """Rebalances in a row do not fail the batch, but /healthz must see that nothing commits:
    oldest_unacked_s counts from the first attempt since the last commit."""
    h = make()
    h.producer.fail["send_offsets_to_transaction"] = [abortable()]
    h.producer.gate = threading.Event()
    h.start()
    first = h.submit(_batch(0, epoch=0), _records("p", 1))
    h.producer.gate.set()
    assert settled(first, 5.0) and first.rewound
    time.sleep(0.2)  # the age to be seen below, not a wait for a background thread
    h.producer.gate.clear()
    second = h.submit(_batch(1, epoch=1), _records("p", 1))
    deadline = time.monotonic() + 5.0
    while h.publisher.oldest_unacked_s == 0.0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert h.publisher.oldest_unacked_s >= 0.2  # since the aborted attempt began
    h.producer.gate.set()
    assert settled(second, 5.0) and second.done
    assert h.publisher.oldest_unacked_s == 0.0


# --- init and close ---------------------------------------------------------------------------


@pytest.mark.parametrize("error", [fatal(), abortable()], ids=["fatal", "abortable"])
def test_init_that_fails_is_a_broker_error_naming_the_transactional_id(
    make: Callable[..., Harness], error: KafkaError
) -> None:
    h = make()
    h.producer.fail["init_transactions"] = [error]
    with pytest.raises(BrokerError) as info:
        h.publisher.init()
    assert TXN_ID in str(info.value) and "cannot start" in str(info.value)


def test_init_retries_a_retriable_error(make: Callable[..., Harness]) -> None:
    h = make()
    h.producer.fail["init_transactions"] = [retriable()]
    h.publisher.init()
    assert h.log.count("init_transactions") == 2


def test_init_gives_up_at_the_transaction_timeout() -> None:
    producer = TxnProducer()
    producer.fail["init_transactions"] = [retriable()] * 1000
    producer.slow_s = 0.02
    pub = TransactionalPublisher(
        {"transactional.id": TXN_ID}, transaction_timeout_s=0.1, producer=producer
    )
    started = time.monotonic()
    with pytest.raises(BrokerError, match="_TIMED_OUT"):
        pub.init()
    assert time.monotonic() - started < 2.0
    pub.close(timeout_s=1.0)


def test_close_finishes_the_transaction_in_progress_and_begins_no_other(
    make: Callable[..., Harness],
) -> None:
    """At close the source has left its group: a batch still queued would only be refused
    for its old generation. It is rewound (read again by the next owner), never begun."""
    h = make()
    h.producer.gate = threading.Event()
    h.start()
    tickets = [h.submit(_batch(i), _records(f"b{i}-", 1)) for i in range(2)]
    deadline = time.monotonic() + 5.0
    while h.publisher.oldest_unacked_s == 0.0:  # batch 0's transaction is under way
        assert time.monotonic() < deadline
        time.sleep(0.01)
    closer = threading.Thread(target=h.publisher.close, kwargs={"timeout_s": 5.0})
    closer.start()
    while not h.publisher._closing:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    h.producer.gate.set()
    closer.join(5.0)
    assert not h.publisher.alive
    assert tickets[0].done and not tickets[0].rewound
    assert tickets[1].rewound
    assert h.producer.visible == [b"b0-0"]


def test_close_without_a_batch_stops_the_thread(make: Callable[..., Harness]) -> None:
    h = make().start()
    assert h.publisher.alive
    h.publisher.close(timeout_s=5.0)
    assert not h.publisher.alive
    assert h.publisher.problem is None


# --- 2. BatchSource: where a rewind goes, without a broker --------------------------------------


class RewindConsumer:
    """Hands out prepared chunks (one per consume() call, then nothing), records seeks and the
    calls a source under exactly_once must never make (store_offsets, commit); its group
    metadata is whatever ``group`` is when asked."""

    def __init__(self, chunks: list[list[Message]]) -> None:
        self.chunks = chunks
        self.group: object = object()
        self.seeks: list[tuple[str, int, int]] = []
        self.forbidden: list[str] = []
        self.closed = False

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]:
        return self.chunks.pop(0) if self.chunks else []

    def seek(self, tp: TopicPartition) -> None:
        self.seeks.append((tp.topic, tp.partition, tp.offset))

    def consumer_group_metadata(self) -> object:
        return self.group

    def store_offsets(self, offsets: list[TopicPartition] | None = None, **_: Any) -> None:
        self.forbidden.append("store_offsets")

    def commit(self, *args: Any, **kwargs: Any) -> None:
        self.forbidden.append("commit")

    def close(self) -> None:
        self.closed = True


def _offsets(batch: SourceBatch) -> list[tuple[int, int]]:
    return [(cast(int, r.partition()), cast(int, r.offset())) for r in batch.records]


def _eos_source(
    handed: list[SourceBatch], consumer: RewindConsumer, *, exactly_once: bool = True
) -> BatchSource:
    source = BatchSource(
        {"group.id": "g"},
        ["in"],
        max_batch_size=2,
        max_wait_ms=60_000,  # a batch closes when full only
        max_in_flight=3,
        hand_off=handed.append,
        drain_timeout_s=1.0,
        exactly_once=exactly_once,
    )
    source._lag_due = float("inf")  # no watermark queries
    source._consumer = cast(Any, consumer)
    source.assignment = [("in", 0), ("in", 1), ("in", 2)]
    return source


def test_a_rewind_seeks_every_owned_partition_to_its_last_committed_offset() -> None:
    handed: list[SourceBatch] = []
    consumer = RewindConsumer(
        [
            [_msg(0, 5), _msg(0, 6)],  # batch 0: the first offset read in 0 is 5
            [_msg(1, 20), _msg(0, 7)],  # batch 1: the first in 1 is 20
            [_msg(0, 8)],  # held, never handed out: dropped by the rewind
            [_msg(0, 7), _msg(1, 20)],  # after the seek: read again
        ]
    )
    source = _eos_source(handed, consumer)
    c: Any = consumer
    source._step(c)
    first_group = consumer.group
    consumer.group = second_group = object()  # a rebalance: a later generation
    source._step(c)
    assert [_offsets(b) for b in handed] == [[(0, 5), (0, 6)], [(1, 20), (0, 7)]]
    assert [(b.seq, b.epoch) for b in handed] == [(0, 0), (1, 0)]
    assert handed[0].group is first_group and handed[1].group is second_group
    assert source._bases == {("in", 0): 5, ("in", 1): 20}
    source.committed(handed[0])  # batch 0's transaction committed: 0 rewinds no further than 7
    assert source._bases == {("in", 0): 7, ("in", 1): 20}
    source._step(c)
    assert len(source.batcher) == 1
    source.rewind()
    assert consumer.seeks == []  # the consumer thread seeks, before it fetches again
    source._step(c)
    # Partition 2 is owned but nothing was read there: nothing to seek.
    assert consumer.seeks == [("in", 0, 7), ("in", 1, 20)]
    assert source.epoch == 1
    assert [_offsets(b) for b in handed[2:]] == [[(0, 7), (1, 20)]]  # not the held 8
    assert (handed[2].seq, handed[2].epoch) == (2, 1)
    assert consumer.forbidden == []


def test_the_base_is_the_first_offset_read_and_committed_moves_only_owned_ones() -> None:
    handed: list[SourceBatch] = []
    consumer = RewindConsumer([[_msg(0, 5), _msg(0, 9)], [_msg(0, 3), _msg(1, 4)]])
    source = _eos_source(handed, consumer)
    c: Any = consumer
    source._step(c)
    source._step(c)
    assert source._bases == {("in", 0): 5, ("in", 1): 4}  # 3 came later: not the first read
    stale = SourceBatch([], {("in", 0): 10, ("in", 5): 99}, seq=9)
    source.committed(stale)
    assert source._bases == {("in", 0): 10, ("in", 1): 4}  # ("in", 5) is not ours


def test_a_revocation_drops_the_base_and_commits_nothing() -> None:
    handed: list[SourceBatch] = []
    consumer = RewindConsumer([[_msg(0, 5), _msg(1, 6)]])
    source = _eos_source(handed, consumer)
    c: Any = consumer
    source._step(c)
    source.done(handed[0])
    source._revoked(c, [TopicPartition("in", 1)])
    assert source._bases == {("in", 0): 5}
    assert source.assignment == [("in", 0), ("in", 2)]
    source.rewind()
    source._step(c)
    assert consumer.seeks == [("in", 0, 5)]  # not the revoked partition
    assert consumer.forbidden == []


def test_at_least_once_a_revocation_still_commits() -> None:
    """The counterpart, so the test above can tell: without exactly_once the same revocation
    stores and commits."""
    handed: list[SourceBatch] = []
    consumer = RewindConsumer([[_msg(0, 5), _msg(1, 6)]])
    source = _eos_source(handed, consumer, exactly_once=False)
    c: Any = consumer
    source._step(c)
    assert handed[0].group is None  # no group metadata outside exactly_once
    source.done(handed[0])
    source._revoked(c, [TopicPartition("in", 1)])
    assert consumer.forbidden == ["store_offsets", "commit"]


def test_under_exactly_once_done_batches_are_never_stored_only_measured() -> None:
    handed: list[SourceBatch] = []
    consumer = RewindConsumer([[_msg(0, 5), _msg(1, 6)]])
    source = _eos_source(handed, consumer)
    c: Any = consumer
    source._step(c)
    source.done(handed[0])
    source._step(c)  # stores what the checkpoint releases, before it fetches
    assert consumer.forbidden == []
    assert source._positions == {("in", 0): 6, ("in", 1): 7}  # the lag still learns
    source._close(c)
    assert consumer.forbidden == [] and consumer.closed


def test_nothing_read_before_a_due_rewind_is_handed_out() -> None:
    handed: list[SourceBatch] = []
    consumer = RewindConsumer([])
    source = _eos_source(handed, consumer)
    source.rewind()  # due: the consumer thread has not seeked yet
    source._send([_msg(0, 5), _msg(0, 6)])
    assert handed == []
    assert source.in_flight == 0
    assert source._slots.acquire(blocking=False)  # the slot was given back
    source._slots.release()


def test_a_dropped_batch_frees_its_slot_and_counts_as_settled() -> None:
    handed: list[SourceBatch] = []
    consumer = RewindConsumer([[_msg(0, i) for i in range(6)]])
    source = _eos_source(handed, consumer)
    source._step(cast(Any, consumer))
    assert len(handed) == 3 and source.in_flight == 3
    assert not source._slots.acquire(blocking=False)  # every slot taken
    source.dropped(handed[1])
    assert source.in_flight == 2
    assert source._slots.acquire(blocking=False)
    source._slots.release()
    assert not source._wait_settled(0.0)  # 0 and 2 still in flight
    source.done(handed[0])
    source.dropped(handed[2])
    assert source._wait_settled(0.0)
    assert source.in_flight == 0
    # The dropped batches release no offset: the lag learns batch 0's only.
    source._store_done(cast(Any, consumer))
    assert source._positions == {("in", 0): 2}


def test_an_abort_after_the_deadline_gets_a_short_grace_not_a_second_timeout(
    make: Callable[..., Harness],
) -> None:
    """send_offsets times out again and again (the coordinator's broker gone) until the
    transaction's deadline; the abort then times out too. It gets ``abort_grace_s`` more, not
    a second whole transaction timeout, and the producer stops (a restart fences the rest)."""
    h = make()
    h.producer.slow_s = 0.25  # each call times out after this long
    h.producer.fail["send_offsets_to_transaction"] = [retriable() for _ in range(100)]
    h.producer.fail["abort_transaction"] = [retriable() for _ in range(100)]
    h.publisher.abort_grace_s = 0.6
    h.start()
    ticket = h.submit(_batch(0), _records("p", 1))
    assert settled(ticket, 15.0)
    assert isinstance(ticket.error, DeliveryError)
    _wait_for(lambda: not h.publisher.alive)
    # ~5 s of send_offsets (the transaction's timeout), then the abort's 0.6 s: 3 or 4 calls
    # (a second full timeout would be about 20).
    assert 16 <= h.log.count("send_offsets_to_transaction") <= 22, h.log
    assert 1 <= h.log.count("abort_transaction") <= 4, h.log
    assert h.publisher.problem is not None and "abort" in h.publisher.problem
    assert h.producer.visible == []


def test_three_transport_errors_in_a_row_fail_the_batch(make: Callable[..., Harness]) -> None:
    """Each is aborted and read again; three in a row with no commit between are counted like
    any abort (max_attempts): the batch fails rather than looping."""
    h = make()
    h.producer.fail["send_offsets_to_transaction"] = [_transport() for _ in range(3)]
    h.start()
    tickets = [h.submit(_batch(0, epoch=e), _records("a", 1)) for e in range(3)]
    for t in tickets:
        assert settled(t, 5.0)
    assert [t.rewound for t in tickets] == [True, True, False]
    assert isinstance(tickets[2].error, DeliveryError)
    assert "3 transactions in a row aborted" in str(tickets[2].error)
    assert h.outcomes == ["aborted"] * 3 and h.producer.visible == []
