"""exactly_once: each micro-batch's records and input offsets as one Kafka transaction.

One thread of its own owns a transactional producer and takes the served batches in the order
they were handed out. For each: ``begin_transaction``; every record the batch made (predictions,
shadow predictions, dead letters) produced; the batch's input offsets (labels included) sent with
the consumer's group metadata taken when the batch was handed out
(``send_offsets_to_transaction``, KIP-447); ``commit_transaction``. Then the batch's ticket
completes and the source learns where a rewind would now seek to. A read_committed reader sees
all of a batch's records or none, and the input offsets move with them: after a crash the next
owner reads exactly from the last committed batch.

Errors, as librdkafka classifies them (``examples/transactions.c``):

- *retriable* (a timed-out call): the same call again, until ``transaction_timeout_s``;
- *abortable* (``txn_requires_abort``: a record refused inside the transaction, offsets sent
  with an old generation after a rebalance, the coordinator aborting a transaction that timed
  out): ``abort_transaction``, then every batch of the same epoch is skipped (never committed)
  and the source rewinds: it seeks every owned partition back to its last committed offset and
  the records are served again. A record the broker refused for good in an aborted attempt
  becomes its dead letter (``undeliverable``) when its batch is served again. After
  ``max_attempts`` aborts in a row with no commit in between the batch fails (its ticket), as a
  batch that cannot be delivered does under at_least_once: the worker stops and restarts;
- anything else (fatal: fenced by a newer producer with the same ``transactional.id``, or by the
  broker's epoch bump after a transaction timed out) fails the batch's ticket and stops the
  thread: this producer can never commit again; :attr:`TransactionalPublisher.problem` says why.

A record too large for its topic (``max.message.bytes`` read at start) is replaced by its dead
letter before it is produced: a transaction is never aborted for a refusal that can be foreseen.

Nothing else may use this producer: a transactional producer refuses records outside a
transaction, so acknowledgements and drift events go through the worker's other, at-least-once
publisher.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from stream_infer.core.events import OutRecord
from stream_infer.errors import BrokerError, DeliveryError
from stream_infer.io.clients import (
    assign_partitions,
    exactly_once_consumer_config,
    framed_size,
    groupless_consumer_config,
)

# PURGED: reports of records an abort purged (expected, not a refusal); BATCH_TOO_LARGE: a
# size refusal (the broker judges a whole record batch against max.message.bytes).
from stream_infer.io.publisher import BATCH_TOO_LARGE, PURGED, Failure, Ticket, classify
from stream_infer.io.source import SourceBatch

log = logging.getLogger(__name__)


class Source(Protocol):
    """What the publisher needs of the batch source
    (:class:`~stream_infer.io.source.BatchSource`)."""

    @property
    def failure(self) -> str | None: ...

    def committed(self, batch: SourceBatch) -> None: ...

    def rewind(self) -> None: ...


class _Abort(Exception):
    """The transaction must be aborted (``txn_requires_abort``). ``moved``: because the
    consumer group moved on (its offsets carried an old generation or member epoch): a
    rebalance, not a fault of the batch."""

    def __init__(self, message: str, *, moved: bool = False) -> None:
        super().__init__(message)
        self.moved = moved


# TxnOffsetCommit refusals that mean the group moved on since the batch was read.
# Calls before the commit on which any error that is not fatal aborts the transaction
# (librdkafka flags only some of them abortable or retriable; a commit's outcome is not known
# after an error, so there an unclassified error stays fatal).
_ABORT_ON_OTHER_ERRORS = frozenset({"send_offsets"})

_GROUP_MOVED = frozenset(
    {
        KafkaError.ILLEGAL_GENERATION,
        KafkaError.UNKNOWN_MEMBER_ID,
        KafkaError.FENCED_INSTANCE_ID,
        KafkaError.REBALANCE_IN_PROGRESS,
        *((KafkaError.STALE_MEMBER_EPOCH,) if hasattr(KafkaError, "STALE_MEMBER_EPOCH") else ()),
    }
)


class _Fatal(Exception):
    """This producer can never commit again."""


# What the thread takes: a batch, its records, its ticket, what to run once it is committed.
_Item = tuple[SourceBatch, Sequence[OutRecord], Ticket, Callable[[], object] | None]


class TransactionalPublisher:
    """The exactly_once publisher: one transaction per batch, in order, on its own thread.

    ``on_stage(stage, seconds)``: each stage's duration (begin, produce, send_offsets, commit,
    abort); ``on_outcome(outcome)``: committed, aborted or skipped per batch.
    """

    def __init__(
        self,
        conf: dict[str, Any],
        *,
        transaction_timeout_s: float,
        undeliverable: Callable[[OutRecord, str], OutRecord | None] | None = None,
        max_message_bytes: Mapping[str, int] | None = None,
        on_stage: Callable[[str, float], None] | None = None,
        on_outcome: Callable[[str], None] | None = None,
        max_attempts: int = 3,
        producer: Any = None,
    ) -> None:
        self.transactional_id = str(conf.get("transactional.id"))
        self._producer: Any = producer if producer is not None else Producer(conf)
        self._source: Source | None = None  # set by start()
        self.timeout_s = transaction_timeout_s
        self._undeliverable = undeliverable
        self._max_message_bytes = dict(max_message_bytes or {})
        self._on_stage = on_stage or (lambda stage, seconds: None)
        self._on_outcome = on_outcome or (lambda outcome: None)
        self.max_attempts = max_attempts
        # An abort after the transaction's own deadline (a call retried until then) gets this
        # long at most: the coordinator has not answered for a whole transaction timeout, and
        # the broker aborts the transaction itself; failing sooner lets a restart recover.
        self.abort_grace_s = min(transaction_timeout_s, 10.0)
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="transactions", daemon=True)
        self._aborted_epoch = -1  # batches of this epoch or older are skipped
        self._aborts_in_row = 0
        # Records the broker refused for good in an aborted attempt, and why: dead letters
        # when their batch is served again (by output topic and input position, :func:`_which`).
        self._refused: dict[tuple[object, ...], str] = {}
        # A size refusal of records within their topics' limits as read at start: a limit
        # lowered since (the producer's batch.size no longer fits it). Ends the batch.
        self._limit_lowered: str | None = None
        # When the first of the attempts since the last commit began: a run of aborts (the
        # group moving on, again and again) shows in oldest_unacked_s, for /healthz.
        self._uncommitted_since: float | None = None
        self._producing: Sequence[OutRecord] = ()  # the records of the transaction in progress
        self._busy_since: float | None = None  # when the transaction in progress began
        self.problem: str | None = None  # why the thread stopped (None while it runs)
        self._closing = False
        self.committed = 0
        self.aborted = 0

    # --- start, submit, stop (other threads) ----------------------------------------------

    def init(self) -> None:
        """Register the ``transactional.id`` with the cluster (blocking): any earlier producer
        with the same id is fenced, and its open transaction aborted."""
        try:
            self._call(
                self._producer.init_transactions,
                "init_transactions",
                time.monotonic() + self.timeout_s,
            )
        except (_Fatal, _Abort) as exc:
            msg = f"the transactional producer {self.transactional_id!r} cannot start: {exc}"
            raise BrokerError(msg) from None
        log.info("transactional.id %s registered", self.transactional_id)

    def start(self, source: Source) -> None:
        """Start taking batches of ``source`` (after :meth:`init`)."""
        self._source = source
        self._thread.start()

    def submit(
        self,
        batch: SourceBatch,
        records: Sequence[OutRecord],
        ticket: Ticket,
        after_commit: Callable[[], object] | None = None,
    ) -> None:
        """Queue a served batch (inference thread): its transaction runs after those of the
        batches submitted before it; ``after_commit`` runs on this thread once it committed."""
        ticket.records = records
        ticket.sent_at = time.monotonic()
        if self._closing:  # the thread takes nothing more: read again by the next owner
            ticket._rewind()
            return
        self._queue.put((batch, records, ticket, after_commit))
        if self.problem is not None:  # the thread stopped: nothing will take it
            self._fail_queued(self.problem)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def oldest_unacked_s(self) -> float:
        """While a transaction is open, how long since the first attempt that has not been
        committed began (aborted attempts in a row count); 0 when none is open."""
        if self._busy_since is None:
            return 0.0
        since = self._uncommitted_since or self._busy_since
        return max(0.0, time.monotonic() - since)

    def close(self, timeout_s: float = 30.0) -> None:
        """Finish what is queued (the source drained its batches before), then stop. A
        transaction is never left open on purpose: an open one holds back every read_committed
        reader of its partitions until the broker times it out."""
        self._closing = True  # what is still queued is not begun: the source has left
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(max(0.1, timeout_s))
        if self._thread.is_alive():
            log.warning("the transaction thread did not finish within %.1f s", timeout_s)

    # --- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            batch, records, ticket, after_commit = item
            try:
                self._serve(batch, records, ticket, after_commit)
            except _Fatal as exc:
                self._stop(f"the transactional producer {self.transactional_id!r}: {exc}", ticket)
                return
            except Exception as exc:  # a bug: the batch must not pass as committed
                # (or a callback of ours raised inside the transaction)
                log.exception("the transaction thread failed")
                self._stop(f"the transaction thread failed: {exc!r}", ticket)
                return
            finally:
                self._busy_since = None

    def _stop(self, problem: str, ticket: Ticket) -> None:
        self.problem = problem
        log.critical("%s; nothing more is committed", problem)
        ticket._fail(DeliveryError(problem, topic="(transaction)"))
        self._fail_queued(problem)

    def _fail_queued(self, problem: str) -> None:
        """What was queued behind a stop waits for nothing: it is never committed. (Set
        :attr:`problem` first: a submit after this drain sees it and drains again.)"""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item[2]._fail(DeliveryError(problem, topic="(transaction)"))

    def _serve(
        self,
        batch: SourceBatch,
        records: Sequence[OutRecord],
        ticket: Ticket,
        after_commit: Callable[[], object] | None,
    ) -> None:
        source = self._source
        assert source is not None  # start() set it
        if batch.epoch <= self._aborted_epoch or source.failure is not None or self._closing:
            # Read before a rewind (or after a failed batch): its records come again.
            self._on_outcome("skipped")
            ticket._rewind()
            return
        self._busy_since = time.monotonic()
        if self._uncommitted_since is None:
            self._uncommitted_since = self._busy_since
        deadline = self._busy_since + self.timeout_s
        keys = _which(records) if self._refused else None
        records = [self._deliverable(r, keys[i] if keys else None) for i, r in enumerate(records)]
        try:
            self._stage("begin", self._producer.begin_transaction)
            self._stage("produce", lambda: self._produce_all(records, deadline))
            positions = [TopicPartition(t, p, o) for (t, p), o in batch.offsets.items()]
            self._stage(
                "send_offsets",
                lambda: self._call(
                    lambda t: self._producer.send_offsets_to_transaction(positions, batch.group, t),
                    "send_offsets",
                    deadline,
                ),
            )
            self._stage(
                "commit",
                lambda: self._call(self._producer.commit_transaction, "commit", deadline),
            )
        except _Abort as exc:
            self._abort(batch, ticket, str(exc), counted=not exc.moved, deadline=deadline)
            return
        self.committed += 1
        self._aborts_in_row = 0
        self._refused.clear()
        self._uncommitted_since = None
        source.committed(batch)
        self._on_outcome("committed")
        if after_commit is not None:
            try:
                after_commit()
            except Exception:  # committed all the same: never fail the batch for it
                log.exception("after batch %d committed", batch.seq)
        ticket.pending = 0
        ticket._settle()

    def _abort(
        self, batch: SourceBatch, ticket: Ticket, why: str, *, counted: bool, deadline: float
    ) -> None:
        """Abort the transaction, then rewind; ``counted``: toward ``max_attempts`` (not when
        the group moved on: rebalances in a row are no poison batch); ``deadline``: the
        transaction's own."""
        started = time.monotonic()
        # What is left of the transaction's time, but at least abort_grace_s (not a second
        # full timeout after a call that used the first one up).
        deadline = max(deadline, started + self.abort_grace_s)
        self._call(self._producer.abort_transaction, "abort", deadline)
        self._producer.poll(0)  # the purged records' reports
        self._on_stage("abort", time.monotonic() - started)
        self.aborted += 1
        self._aborts_in_row += 1 if counted else 0
        self._on_outcome("aborted")
        self._aborted_epoch = batch.epoch
        problem = None
        if self._limit_lowered is not None:
            problem = (
                f"{self._limit_lowered}: an output topic's max.message.bytes is lower than when "
                "this worker started (its producer's batch.size was fitted to it then); a "
                "restart reads it again"
            )
        elif self._aborts_in_row >= self.max_attempts:
            problem = f"{self._aborts_in_row} transactions in a row aborted, the last: {why}"
        if problem is not None:
            log.critical("batch %d failed: %s", batch.seq, problem)
            ticket._fail(DeliveryError(problem, topic="(transaction)"))
            return
        log.warning(
            "batch %d: transaction aborted (%s); its input is read and served again", batch.seq, why
        )
        assert self._source is not None
        self._source.rewind()
        ticket._rewind()

    def _stage(self, stage: str, run: Callable[[], object]) -> None:
        started = time.monotonic()
        run()
        self._on_stage(stage, time.monotonic() - started)

    def _call(self, call: Callable[[float], object], what: str, deadline: float) -> None:
        """A transactional API call: again while it fails retriably, until ``deadline``."""
        while True:
            left = deadline - time.monotonic()
            try:
                call(max(0.1, left))
                return
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if not isinstance(err, KafkaError):
                    raise _Fatal(f"{what}: {exc}") from exc
                if err.fatal():
                    raise _Fatal(f"{what}: {err.name()}: {err.str()}{_why_fenced(err)}") from exc
                if err.txn_requires_abort():
                    if what == "abort":
                        raise _Fatal(f"abort: {err.name()}: {err.str()}") from exc
                    moved = err.code() in _GROUP_MOVED
                    raise _Abort(f"{what}: {err.name()}: {err.str()}", moved=moved) from exc
                if err.retriable() and time.monotonic() < deadline:
                    log.info("%s: %s, trying again", what, err.str())
                    continue
                if what in _ABORT_ON_OTHER_ERRORS:
                    # Neither fatal, abortable nor retriable (a coordinator's connection lost,
                    # _TRANSPORT, when the broker leading it died): nothing of this transaction
                    # is committed yet, so aborting it and reading the batch again is safe.
                    raise _Abort(f"{what}: {err.name()}: {err.str()}", moved=False) from exc
                raise _Fatal(f"{what}: {err.name()}: {err.str()}{_why_fenced(err)}") from exc

    def _deliverable(self, record: OutRecord, which: tuple[object, ...] | None) -> OutRecord:
        """The record, or its dead letter when its topic cannot take it (too large, or, by
        ``which`` (:func:`_which`), refused for good in an aborted attempt)."""
        why = self._refused.get(which) if which is not None else None
        limit = self._max_message_bytes.get(record.topic)
        size = framed_size(record.key, record.value)
        if why is None and limit is not None and size > limit:
            why = f"{size} bytes with framing over {record.topic}'s max.message.bytes {limit}"
        if why is None:
            return record
        letter = self._undeliverable(record, why) if self._undeliverable is not None else None
        if letter is None:
            msg = f"a record for {record.topic} cannot be delivered ({why}) and has no dead letter"
            raise _Fatal(msg)
        return letter

    def _produce_all(self, records: Sequence[OutRecord], deadline: float) -> None:
        self._producing = records
        for record in records:
            while True:
                try:
                    self._producer.produce(
                        record.topic, record.value, record.key, on_delivery=self._reported
                    )
                    break
                except BufferError:
                    # The local queue is full: it drains as the broker acknowledges.
                    if time.monotonic() > deadline:
                        raise _Abort("the producer's queue stayed full") from None
                    self._producer.poll(0.05)
                except KafkaException as exc:
                    err = exc.args[0]
                    if err.fatal():
                        raise _Fatal(f"produce: {err.name()}: {err.str()}") from exc
                    raise _Abort(f"produce: {err.name()}: {err.str()}") from exc
        self._producer.poll(0)

    def _reported(self, err: KafkaError | None, msg: Message) -> None:
        """A delivery report (served inside ``poll`` and ``commit_transaction``)."""
        if err is None or err.code() in PURGED:
            return
        topic, key, value = msg.topic() or "", msg.key(), msg.value() or b""
        limit = self._max_message_bytes.get(topic)
        fits = limit is not None and framed_size(key, value) <= limit
        # Only what fails the same way at every attempt (a delivery report's error carries no
        # retriable flag: classify by its code, as the at_least_once publisher does); a
        # transient error, a missing ACL or a timeout aborts and is served again as is. A size
        # refusal of a record within its topic's limit as read at start is its batch's: the
        # limit was lowered since, and every batch would be refused: the batch fails (a
        # restart fits the producer's batches to the limit again), nothing is dead-lettered.
        permanent = classify(err, fits_alone=fits) is Failure.PERMANENT
        if not permanent and err.code() in BATCH_TOO_LARGE:
            self._limit_lowered = f"{topic} refused a batch of records as too large"
        elif permanent:
            producing = self._producing
            at = next(  # a scan: refusals only
                (
                    i
                    for i, r in enumerate(producing)
                    if r.value == value and r.topic == topic and r.key == key
                ),
                None,
            )
            which = (
                _which(producing)[at]
                if at is not None
                else _which([OutRecord(topic, key, value)])[0]
            )
            self._refused[which] = f"{err.name()}: {err.str()}"
        log.warning("a record for %s was refused in a transaction: %s", msg.topic(), err.str())


_FENCED = frozenset(
    {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH}
)


def _why_fenced(err: KafkaError) -> str:
    """What a fenced producer means here, for the log line that ends the worker."""
    if err.code() not in _FENCED:
        return ""
    return (
        " (a producer with this transactional.id started since: this worker restarted, or "
        "another live worker has the same worker.id; or the broker aborted this worker's "
        "transaction after kafka.transaction_timeout_ms, while it was frozen or cut off)"
    )


def _which(records: Sequence[OutRecord]) -> list[tuple[object, ...]]:
    """Each of a batch's records across attempts: its output topic, the input record it was
    made from, and its rank among the batch's records of that topic made from that input (two
    models' predictions of one event go to one topic, in the models' order); its bytes when
    it was made from no input record. A prediction served again differs in its bytes (its
    timestamps)."""
    seen: Counter[tuple[object, ...]] = Counter()
    out: list[tuple[object, ...]] = []
    for record in records:
        source = record.source
        if source is None:
            out.append((record.topic, record.key, record.value))
            continue
        where = (record.topic, source.topic(), source.partition(), source.offset())
        out.append((*where, seen[where]))
        seen[where] += 1
    return out


def transactions_problem(
    producer_conf: Mapping[str, Any],
    consumer_conf: Mapping[str, Any],
    topic: str,
    timeout_s: float = 15.0,
) -> str | None:
    """Why this cluster's transactions cannot be trusted (None: they work).

    ``init_transactions`` succeeding is not enough: the embedded broker (tansu) accepts every
    transactional call and then returns an aborted record to a read_committed reader. So: one
    record produced to partition 0 of ``topic`` and aborted, one produced and committed; a
    read_committed reader from the aborted one's offset must reach the committed one without
    seeing the aborted one. ``producer_conf``: a transactional producer's configuration (its
    ``transactional.id`` is used for this probe only). Calls that time out are tried again
    within ``timeout_s`` (the first ``init_transactions`` on a new cluster creates the
    transaction log). Raises :class:`BrokerError` when the check cannot be made (the cluster
    slow, the transaction log unavailable): that says nothing against its transactions.
    """
    probe = _Probe(topic, time.monotonic() + timeout_s)
    try:
        probe.write(Producer(dict(producer_conf)))
    except KafkaException as exc:
        err = exc.args[0] if exc.args else None
        if isinstance(err, KafkaError) and err.code() in _NO_TRANSACTIONS:
            return f"the cluster has no transactions ({err.name()}: {err.str()})"
        why = err.str() if isinstance(err, KafkaError) else str(exc)
        msg = (
            f"cannot check that the cluster's transactions work: {why} (a slow cluster, or its "
            "transaction log unavailable: the brokers' transaction.state.log.replication.factor "
            "and min.isr must be met by the live brokers)"
        )
        raise BrokerError(msg) from None
    conf = groupless_consumer_config(consumer_conf, "txn-probe") | exactly_once_consumer_config()
    return probe.read(Consumer(conf), timeout_s)


class _Probe:
    """:func:`transactions_problem`'s two records: written (one aborted, one committed), then
    read back."""

    def __init__(self, topic: str, deadline: float) -> None:
        nonce = uuid.uuid4().hex
        self.topic = topic
        self.deadline = deadline
        self.aborted = f'{{"probe":"aborted-{nonce}"}}'.encode()
        self.committed = f'{{"probe":"committed-{nonce}"}}'.encode()
        self.offsets: dict[bytes, int] = {}
        self.failures: list[str] = []

    def _left(self) -> float:
        return max(0.1, self.deadline - time.monotonic())

    def _call(self, run: Callable[[float], object]) -> None:
        """A transactional call, again while it times out (retriable), until the deadline."""
        while True:
            try:
                run(self._left())
                return
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if not (isinstance(err, KafkaError) and err.retriable()):
                    raise
                if time.monotonic() >= self.deadline:
                    raise

    def _report(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.failures.append(err.str())
        else:
            self.offsets[msg.value() or b""] = msg.offset() or 0

    def write(self, producer: Producer) -> None:
        open_transaction = False
        try:
            self._call(producer.init_transactions)
            for value in (self.aborted, self.committed):
                producer.begin_transaction()
                open_transaction = True
                producer.produce(self.topic, value, partition=0, on_delivery=self._report)
                if value == self.aborted:
                    producer.flush(self._left())
                    self._call(producer.abort_transaction)
                else:
                    self._call(producer.commit_transaction)
                open_transaction = False
            producer.poll(0)
        finally:
            if open_transaction:  # never leave one open: it would hold back the next probe
                with contextlib.suppress(KafkaException):
                    producer.abort_transaction(1.0)
            producer.flush(1.0)
        if self.failures or self.aborted not in self.offsets:
            why = "; ".join(self.failures) or "no delivery report"
            raise BrokerError(f"the probe record was not acknowledged ({why})")

    def read(self, reader: Consumer, timeout_s: float) -> str | None:
        start = self.offsets[self.aborted]
        try:
            assign_partitions(reader, {self.topic: [0]}, start)
            while time.monotonic() < self.deadline:
                msg = reader.poll(0.2)
                if msg is None or msg.error() is not None:
                    continue
                if msg.value() == self.aborted:
                    return (
                        f"a read_committed reader was given an aborted record ({self.topic}[0] "
                        f"offset {start})"
                    )
                if msg.value() == self.committed:
                    return None
        finally:
            reader.close()
        why = f"the committed probe record was not read back within {timeout_s:g} s"
        raise BrokerError(f"{why} ({self.topic}[0])")


# init_transactions on a broker without transactions (no InitProducerId).
_NO_TRANSACTIONS = frozenset({KafkaError.UNSUPPORTED_VERSION, KafkaError._UNSUPPORTED_FEATURE})
