"""The input side: a consumer thread that micro-batches records and hands over whole batches.

One thread owns the confluent-kafka consumer. It fills a :class:`MicroBatcher` and hands each
closed batch to a callback (the runtime puts it on a faust channel: one item per batch, not
per event). At most ``max_in_flight`` batches may be handed over and not yet done; past that
the thread stops fetching, which is the backpressure (librdkafka's prefetch is bounded too).
The time it spends waiting for a free slot is reported to ``on_backpressure`` (seconds).

Latency stages, measured here at little cost: ``on_fetch_delay`` gets, once per fetched chunk,
the wall-clock time since the chunk's oldest record timestamp (time in Kafka and in the
client's queue before this thread got the record); each batch carries ``opened_at``, when its
first record arrived, and ``closed_at``, when it was handed over.

Offsets: which may be committed is the :class:`Checkpoint`'s decision. Each batch handed over
gets a sequence number; :meth:`BatchSource.done` (the runtime calls it once every record the
batch produced is acknowledged) marks it delivered, and the consumer thread stores the offsets
of the contiguous prefix of delivered batches. librdkafka commits stored offsets in the
background, on revocation and on close. :meth:`BatchSource.fail` latches a batch that cannot
be served: nothing is handed out after it, and nothing at or after it is stored or committed;
the thread then commits the prefix before it and closes the consumer, so that the next owner
(or this worker, restarted) reads again from the failed batch. On revocation and on close the
thread first waits for the batches in flight, within one deadline
(``drain_timeout_s`` from the moment the source stops, or from the revocation).

A topic or group the worker's principal may not read (TOPIC_AUTHORIZATION_FAILED,
GROUP_AUTHORIZATION_FAILED) is noted once in :class:`AccessRefusals` (an ERROR line naming it
and the permission, a health problem) while librdkafka keeps retrying; records from the topic,
or an assignment, clear it. With ``group.protocol=consumer`` on Kafka >= 4.0 a subscribed topic
without Describe fails the whole heartbeat (KAFKA-18813): the error names no topic, so the
subscription is noted as refused, naming every subscribed topic.

A fatal consumer error (``err.fatal()``: e.g. a fenced static member, or a group refusal on
the KIP-848 heartbeat, which librdkafka makes fatal) ends the consumer thread with it as
:attr:`BatchSource.error` (``/healthz`` answers 500 naming it): the consumer is unusable. A
group the broker will not let us join because of our configuration (INVALID_SESSION_TIMEOUT)
is logged once at ERROR and kept in :attr:`BatchSource.group_problem` until an assignment.

The lag measurement (every ``lag_interval_s``, counted from the end of the last one) has a
time budget of its own, ``lag_budget_s``, over all its blocking calls: high watermarks come from
librdkafka's cache (updated by every fetch) while records are consumed, from the brokers only
while consumption is paused or the cache knows none; committed offsets are asked once for all
the partitions that need them. A partition not measured this time keeps its last figure.

Before it, the metadata refresh asks the cluster for the subscribed topics (their partition
counts) and the ``watched`` ones (the other topics the worker needs), one request per topic, as
many as fit in ``metadata_budget_s``, its own budget, in turn from where the last refresh
stopped (on a slow cluster each is asked less often, none skipped). The first
request gets its whole timeout, ``metadata_timeout_s``; a later one gets what is left of the
budget, and when that runs out the refresh stops, which is no outage. A topic the cluster
answers does not exist in two answers running is in :attr:`BatchSource.vanished` (deleted, or
a broker that came back without its data) and stays there until the worker restarts: a
topic that reappears was created again empty (by a restarted peer, say), and for the control
topic a peer that kept its routing in memory would serve another routing than the restarted
ones, rebuilt from the new log. What the refresh learns of the cluster goes to the
:class:`Reachability`: metadata returned is a broker answering, a request no broker answered
(:func:`~stream_infer.io.reachability.no_broker_answered`) an outage. Records fetched are not
taken as an answer: they may come from librdkafka's prefetched queue, fetched before the
outage began; while an outage is marked they bring the next refresh forward (at most one per
``metadata_timeout_s``), whose answer clears it. Consumer errors repeated are logged once per
kind and interval, with a count.

Under exactly_once (``exactly_once=True``) the offsets are not this thread's to commit: each
batch carries the consumer's group metadata taken when it is handed out (the generation that
fetched it, KIP-447) and its ``epoch``, and the transactional publisher sends its offsets in the
batch's transaction. Nothing is stored or committed here (auto-commit is off). When a transaction
is aborted the publisher calls :meth:`BatchSource.rewind`: before it fetches again, this thread
drops the records it holds, starts a new epoch (every batch of the old one is skipped, never
committed) and seeks every owned partition back to its last committed offset, which it knows
locally: the first offset it read there, then each committed batch's next offset
(:meth:`BatchSource.committed`). The records are then read and served again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from stream_infer.core.batching import MicroBatcher
from stream_infer.io.access import AccessRefusals, is_refusal
from stream_infer.io.checkpoint import Checkpoint
from stream_infer.io.clients import consume_ready
from stream_infer.io.reachability import Reachability, no_broker_answered
from stream_infer.io.repeated_log import RateLimitedLog

log = logging.getLogger(__name__)

# The kind of resource a KIP-848 heartbeat's TOPIC_AUTHORIZATION_FAILED refuses: it names no
# topic (one of them lacks Describe, which Read includes), so the whole subscription: "Read on
# one of the subscribed topics 'in, labels'".
SUBSCRIPTION = "one of the subscribed topics"

# A topic is vanished once this many metadata answers in a row said it does not exist (one
# answer may come from a broker that has not caught up with a topic just created).
VANISHED_AFTER = 2
_NO_TOPIC = frozenset({KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC})


@dataclass(slots=True)
class SourceBatch:
    """A closed micro-batch and the offsets to store once it is delivered.

    ``opened_at``: when its first record reached the consumer thread; ``closed_at``: when it
    was handed over (after any backpressure pause). Both ``time.monotonic()``. ``seq``: its
    number in the source's :class:`Checkpoint` (-1: not handed over by a source).
    """

    records: list[Message]
    offsets: dict[tuple[str, int], int]
    closed_at: float = field(default_factory=time.monotonic)
    opened_at: float | None = None
    seq: int = -1
    # exactly_once: the rewind epoch it was read in, and the consumer's group metadata when
    # it was handed out (its transaction's offsets are sent with it).
    epoch: int = 0
    group: object | None = None


def next_offsets(records: Sequence[Message]) -> dict[tuple[str, int], int]:
    """For each (topic, partition) in the batch, the offset after its last record."""
    offsets: dict[tuple[str, int], int] = {}
    for record in records:
        # Records from consume() always carry their topic, partition and offset.
        key = (cast(str, record.topic()), cast(int, record.partition()))
        offsets[key] = cast(int, record.offset()) + 1
    return offsets


class BatchSource:
    def __init__(
        self,
        conf: dict[str, Any],
        topics: list[str],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_in_flight: int,
        hand_off: Callable[[SourceBatch], None],
        drain_timeout_s: float = 30.0,
        on_assignment: Callable[[list[tuple[str, int]]], None] | None = None,
        on_backpressure: Callable[[float], None] | None = None,
        on_partition_counts: Callable[[dict[str, int]], None] | None = None,
        on_fetch_delay: Callable[[float], None] | None = None,
        access: AccessRefusals | None = None,
        reachability: Reachability | None = None,
        watched: Sequence[str] = (),
        exactly_once: bool = False,
    ) -> None:
        self._conf = conf
        self.exactly_once = exactly_once
        # exactly_once: the rewind epoch of the batches handed out now, whether a rewind is
        # due, and each owned partition's last committed offset (where a rewind seeks to).
        self.epoch = 0
        self._rewind_due = False
        self._bases: dict[tuple[str, int], int] = {}
        self.access = access if access is not None else AccessRefusals()
        self.reachability = reachability if reachability is not None else Reachability()
        self.topics = topics
        # Topics not consumed whose existence is checked with the subscribed ones.
        self.watched = [t for t in dict.fromkeys(watched) if t not in topics]
        # Metadata answers in a row that said a topic does not exist (consumer thread only).
        self._absent: dict[str, int] = {}
        # The topics found vanished since start, published whole by the consumer thread (read
        # on the event loop: never a container another thread changes).
        self._vanished: tuple[str, ...] = ()
        self._ask_next = 0  # where the next metadata refresh starts in the needed topics
        self.metadata_timeout_s = 1.0  # a metadata request's whole timeout
        self.metadata_budget_s = 1.0  # most time one metadata refresh may block the thread
        self._measured_at = 0.0  # when the last refresh and lag measurement ended
        self._repeats = RateLimitedLog(log)
        self.batcher: MicroBatcher[Message] = MicroBatcher(max_batch_size, max_wait_ms)
        self._hand_off = hand_off
        self.drain_timeout_s = drain_timeout_s
        self._on_assignment = on_assignment
        self._on_backpressure = on_backpressure
        self._on_fetch_delay = on_fetch_delay
        self._opened_at = 0.0  # when the open batch's first record arrived (monotonic)
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self.max_in_flight = max_in_flight
        # Which offsets may be stored; guarded by _idle (done/fail come from the event loop).
        self.checkpoint = Checkpoint()
        self._idle = threading.Condition()
        self._stopping = threading.Event()
        self._drain_deadline: float | None = None  # set once: when waiting for in-flight ends
        self._consumer: Consumer | None = None
        self._thread = threading.Thread(target=self._run, name="batch-source", daemon=True)
        self.assignment: list[tuple[str, int]] = []
        self.error: BaseException | None = None
        # Why the group will not take this consumer in (our configuration), until assigned.
        self.group_problem: str | None = None
        # Records behind the end of each owned partition, refreshed every lag_interval_s: the
        # end offset minus the offset stored for commit, so what Kafka's admin API reports for
        # the group (end minus committed), up to one auto-commit interval.
        self.lag: dict[tuple[str, int], int] = {}
        self.lag_interval_s = 5.0
        self.lag_budget_s = 1.0  # most time one lag measurement may block the consumer thread
        self._positions: dict[tuple[str, int], int] = {}
        self._lag_due = 0.0
        # Partitions of each subscribed topic, as the cluster reports them (same refresh).
        self.partition_counts: dict[str, int] = {}
        self._on_partition_counts = on_partition_counts

    def start(self) -> None:
        self._consumer = Consumer(self._conf)
        self._thread.start()

    @property
    def in_flight(self) -> int:
        """Batches handed over and not yet delivered."""
        return self.checkpoint.in_flight

    @property
    def failure(self) -> str | None:
        """Why a batch could not be served (None while none failed)."""
        return self.checkpoint.failure

    def done(self, batch: SourceBatch) -> None:
        """The batch's records are all delivered: mark it in the checkpoint, free its slot.

        The consumer thread stores the offsets the checkpoint releases (only that thread
        touches the consumer), before its next fetch and always before a revocation or close
        commits.
        """
        with self._idle:
            self.checkpoint.delivered(batch.seq)
            self._idle.notify_all()
        self._slots.release()

    def dropped(self, batch: SourceBatch) -> None:
        """exactly_once: the batch was rewound (its transaction, or one before it, aborted):
        nothing of it is committed, its records are read again; free its slot."""
        with self._idle:
            self.checkpoint.drop(batch.seq)
            self._idle.notify_all()
        self._slots.release()

    def committed(self, batch: SourceBatch) -> None:
        """exactly_once: the batch's transaction committed its offsets (the transactional
        publisher's thread, before it begins the next): a rewind seeks no further back."""
        with self._idle:
            for tp, offset in batch.offsets.items():
                if tp in self._bases:  # still owned (a revocation drops its base)
                    self._bases[tp] = offset

    def rewind(self) -> None:
        """exactly_once: a transaction was aborted. Before it fetches again the consumer
        thread starts a new epoch and seeks every owned partition back to its last committed
        offset; the batches of the old epoch are never committed (the publisher skips them)."""
        with self._idle:
            self._rewind_due = True

    def fail(self, batch: SourceBatch, reason: str) -> None:
        """The batch cannot be served: nothing after it is handed out, and nothing at or after
        it is stored or committed. The consumer thread commits the prefix and closes."""
        with self._idle:
            first = not self.checkpoint.failed
            self.checkpoint.fail(batch.seq, reason)
            self._idle.notify_all()
        if first:
            log.critical(
                "batch %d (%s) failed: %s; nothing at or after it is committed, nothing more "
                "is consumed",
                batch.seq,
                ", ".join(f"{t}[{p}] to {o}" for (t, p), o in sorted(batch.offsets.items())),
                reason,
            )

    def _store_done(self, consumer: Consumer) -> None:
        with self._idle:
            stored = self.checkpoint.release()
        if not stored:
            return
        if self.exactly_once:  # committed in the batches' transactions: only the lag learns
            owned = set(self.assignment)
            self._positions.update((tp, o) for tp, o in stored.items() if tp in owned)
            return
        offsets = [TopicPartition(t, p, o) for (t, p), o in stored.items()]
        try:
            consumer.store_offsets(offsets=offsets)
        except KafkaException as exc:
            # The partition was revoked meanwhile: its new owner re-reads from the last
            # committed offset, so nothing is lost (the batch may be served twice).
            log.info("offsets not stored (%s): %s", exc.args[0].str(), offsets)
            return
        # store_offsets ignores partitions not assigned any more (no error): a batch done
        # after its partition was revoked must not bring the partition back into the lag.
        owned = set(self.assignment)
        self._positions.update((tp, o) for tp, o in stored.items() if tp in owned)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop consuming; wait for the batches in flight until ``timeout_s`` from now (one
        deadline for the close and the revocation it brings), commit, close the consumer."""
        if self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + timeout_s
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(max(0.0, self._drain_deadline - time.monotonic()) + 5.0)

    def _wait_settled(self, timeout_s: float) -> bool:
        """Wait until nothing more can be released by waiting (every batch before a failed
        one, or every batch, delivered)."""
        with self._idle:
            return self._idle.wait_for(lambda: self.checkpoint.settled, max(0.0, timeout_s))

    def _drain_left_s(self) -> float:
        """Time left to wait for batches in flight: until the stop's deadline while closing
        (a revocation during close shares it), else a whole drain timeout."""
        if self._drain_deadline is None:
            return self.drain_timeout_s
        return max(0.0, self._drain_deadline - time.monotonic())

    @property
    def _ending(self) -> bool:
        return self._stopping.is_set() or self.checkpoint.failed

    # --- the consumer thread -------------------------------------------------------------

    def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None  # start() set it
        try:
            consumer.subscribe(self.topics, on_assign=self._assigned, on_revoke=self._revoked)
            while not self._ending:
                self._step(consumer)
        except BaseException as exc:
            self.error = exc
            log.exception("the batch source failed")
        finally:
            try:
                self._close(consumer)
            except Exception:
                log.exception("closing the consumer failed")

    def _step(self, consumer: Consumer) -> None:
        if self._rewind_due:
            self._rewind(consumer)
        self._store_done(consumer)
        if time.monotonic() >= self._lag_due:
            self._measure_lag(consumer)
        # librdkafka's consume() returns when it has num_messages or at the timeout, whichever
        # first: exactly a batch's "full or max wait". An empty batch has no deadline yet, so
        # take what is already fetched, or block for the first record only.
        wait = self.batcher.time_left_s()
        room = max(1, self.batcher.room)
        if wait is None:
            records = consume_ready(consumer, room, 0.1)
        else:
            records = consumer.consume(num_messages=room, timeout=wait)
        if records:
            received, received_wall = time.monotonic(), time.time()
            good = [r for r in records if r.error() is None]
            if len(good) != len(records):
                self._errors(records)
            if good and self.reachability.mark is not None:
                # Maybe prefetched before the outage: ask the cluster soon instead.
                self._lag_due = min(self._lag_due, self._measured_at + self.metadata_timeout_s)
            if good and self.access.active:
                for topic in {r.topic() for r in good}:
                    self.access.allowed("topic", topic or "")
            if good and self._on_fetch_delay is not None:
                self._report_fetch_delay(good, received_wall)
            if good and self.exactly_once and len(self._bases) < len(self.assignment):
                # Until every owned partition has its base: then nothing per record here.
                bases = self._bases
                for r in good:  # the first offset read in a partition: where a rewind goes
                    tp = (cast(str, r.topic()), cast(int, r.partition()))
                    if tp not in bases:
                        with self._idle:
                            bases.setdefault(tp, cast(int, r.offset()))
            if not len(self.batcher):
                self._opened_at = received
            for batch in self.batcher.add_many(good):
                self._send(batch, self._opened_at)
                self._opened_at = received  # the next batch starts with this chunk
        closed = self.batcher.poll()
        if closed:
            self._send(closed, self._opened_at)

    def _rewind(self, consumer: Consumer) -> None:
        """exactly_once, after an aborted transaction: a new epoch, the records held here
        dropped, every owned partition read again from its last committed offset (seek also
        drops what librdkafka prefetched for it)."""
        with self._idle:
            self._rewind_due = False
            self.epoch += 1
            owned = set(self.assignment)
            targets = sorted((tp, o) for tp, o in self._bases.items() if tp in owned)
        held = len(self.batcher)
        self.batcher.flush()
        for (topic, partition), offset in targets:
            # Raises (ending this thread: /healthz fails, the worker restarts from the
            # committed offsets) if the partition cannot be sought: never a silent skip.
            consumer.seek(TopicPartition(topic, partition, offset))
        log.warning(
            "transaction aborted: %d records held dropped, epoch %d reads again from %s",
            held,
            self.epoch,
            ", ".join(f"{t}[{p}]@{o}" for (t, p), o in targets) or "nothing read yet",
        )

    def _errors(self, records: list[Message]) -> None:
        """Consumer errors: fatal ones end the thread (raised); refusals and configuration the
        group refuses noted once (librdkafka keeps retrying); others logged."""
        for r in records:
            err = r.error()
            if err is None or err.code() == KafkaError._PARTITION_EOF:
                continue
            if err.fatal():
                raise KafkaException(err)
            if err.code() == KafkaError.GROUP_AUTHORIZATION_FAILED:
                self.access.refused("group", str(self._conf.get("group.id")), "Read", err.name())
            elif is_refusal(err) and r.topic():
                self.access.refused("topic", r.topic() or "", "Read", err.name())
            elif err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
                # KIP-848 heartbeat (Kafka >= 4.0): some subscribed topic lacks Describe.
                self.access.refused(SUBSCRIPTION, self._subscription, "Read", err.name())
            elif err.code() == KafkaError.INVALID_SESSION_TIMEOUT:
                self._session_timeout_refused(err)
            else:
                key = (err.code(), r.topic())
                self._repeats.log(logging.WARNING, key, "consumer error: %s", err.str())

    @property
    def _subscription(self) -> str:
        return ", ".join(self.topics)

    def _session_timeout_refused(self, err: KafkaError) -> None:
        if self.group_problem is not None:
            return  # librdkafka retries the join: reported once
        self.group_problem = (
            f"the broker refuses to let this worker join group "
            f"{self._conf.get('group.id')!r} ({err.name()}: {err.str()}): "
            f"kafka.session_timeout_ms={self._conf.get('session.timeout.ms')} is outside the "
            "broker's group.min.session.timeout.ms..group.max.session.timeout.ms (Apache "
            "Kafka's defaults: 6000..1800000); nothing is consumed until they agree"
        )
        log.error("%s", self.group_problem)

    def _report_fetch_delay(self, records: list[Message], received: float) -> None:
        """Arrival (wall clock) minus the chunk's oldest record timestamp. The timestamps are
        whole milliseconds (so up to 1 ms is added); about 0.1 us per record."""
        assert self._on_fetch_delay is not None
        oldest_ms = min(r.timestamp()[1] for r in records)
        if oldest_ms > 0:  # -1: a record without a timestamp
            self._on_fetch_delay(max(0.0, received - oldest_ms / 1000.0))

    def _send(self, records: list[Message], opened_at: float | None = None) -> None:
        if not self._slots.acquire(blocking=False):
            # Every slot is taken: consumption pauses here until a batch is done (the pause is
            # reported as it goes, so a long one shows while it lasts).
            since = time.monotonic()
            while not self._slots.acquire(timeout=0.1):
                since = self._paused(since)
                if self._ending:
                    return  # not handed off, not stored: re-read after restart
                self._while_paused()
            self._paused(since)
        offsets = next_offsets(records)
        group = None
        if self.exactly_once and self._consumer is not None:
            # Taken now, under the generation that fetched these records: a transaction of a
            # batch fetched before the group moved on is refused, whenever it commits.
            group = self._consumer.consumer_group_metadata()
        with self._idle:
            # Nothing is handed out after a failed batch; nor, while a rewind is due, records
            # read before it (they are read again).
            if self.checkpoint.failed or self._rewind_due:
                self._slots.release()
                return
            seq = self.checkpoint.begin(offsets)
            epoch = self.epoch
        self._hand_off(
            SourceBatch(records, offsets, opened_at=opened_at, seq=seq, epoch=epoch, group=group)
        )

    def _while_paused(self) -> None:
        """Keep measuring the lag while consumption is paused: that is when the lag matters
        most (it used to freeze at its last value until a slot was free). Nothing is fetched
        meanwhile, so librdkafka's cached end offsets go stale: ask the brokers."""
        if self._consumer is not None and time.monotonic() >= self._lag_due:
            self._measure_lag(self._consumer, paused=True)

    def _paused(self, since: float) -> float:
        now = time.monotonic()
        if self._on_backpressure is not None:
            self._on_backpressure(now - since)
        return now

    def _measure_lag(self, consumer: Consumer, *, paused: bool = False) -> None:
        """Refresh the topics' metadata within ``metadata_budget_s``, then :attr:`lag` within
        ``lag_budget_s``; the next measurement is due ``lag_interval_s`` after this one ends
        (not starts)."""
        self._repeats.flush_due()
        try:
            self._count_partitions(consumer, time.monotonic() + self.metadata_budget_s)
            self._lag_within(consumer, time.monotonic() + self.lag_budget_s, paused)
        finally:
            self._measured_at = time.monotonic()
            self._lag_due = self._measured_at + self.lag_interval_s

    def _lag_within(self, consumer: Consumer, deadline: float, paused: bool) -> None:
        owned = list(self.assignment)
        mine = set(owned)
        lag = {tp: n for tp, n in self.lag.items() if tp in mine}  # kept if not measured
        marks: dict[tuple[str, int], tuple[int, int]] = {}
        for topic, partition in owned:
            tp = TopicPartition(topic, partition)
            known = (topic, partition) in self._positions
            found = None
            if not paused:
                try:
                    found = consumer.get_watermark_offsets(tp, cached=True)
                except KafkaException:
                    found = None
            # Without a stored position the low watermark is needed too, which the cache only
            # has with statistics.interval.ms: ask.
            if not found or found[1] < 0 or (not known and found[0] < 0):
                left = deadline - time.monotonic()
                if left <= 0:
                    continue
                try:
                    found = consumer.get_watermark_offsets(tp, timeout=min(1.0, left))
                except KafkaException:
                    found = None
            if found and found[1] >= 0:
                marks[(topic, partition)] = (found[0], found[1])
        asked = [TopicPartition(t, p) for t, p in marks if (t, p) not in self._positions]
        committed: dict[tuple[str, int], int] = {}
        left = deadline - time.monotonic()
        if asked and left > 0:
            try:
                for tp in consumer.committed(asked, timeout=min(1.0, left)):
                    if tp.error is None:
                        committed[(tp.topic, tp.partition)] = tp.offset
            except KafkaException:
                # The group coordinator is slow or moving (a broker died): measured again
                # next time. Raising here would stop the consumer thread for good.
                pass
        for key, (low, high) in marks.items():
            position = self._positions.get(key, committed.get(key))
            if position is None:
                continue  # not measured: its last figure stays
            # No commit yet (negative), or one behind what retention deleted: the consumer
            # starts at the low watermark (auto.offset.reset=earliest).
            position = max(position, low, 0)
            lag[key] = max(0, high - position)
        self.lag = lag

    @property
    def vanished(self) -> tuple[str, ...]:
        """Topics (subscribed or watched) the cluster said, in :data:`VANISHED_AFTER` metadata
        answers running, do not exist, since this worker started (sorted): one that exists
        again was created anew, empty, and only a restart makes the worker whole again."""
        return self._vanished

    def _count_partitions(self, consumer: Consumer, deadline: float) -> None:
        counts = dict(self.partition_counts)
        subscribed = set(self.topics)
        needed = [*self.topics, *self.watched]
        start = self._ask_next % len(needed) if needed else 0
        asked = 0
        for i, topic in enumerate(needed[start:] + needed[:start]):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            timeout = self.metadata_timeout_s if i == 0 else min(self.metadata_timeout_s, left)
            try:
                meta = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if isinstance(err, KafkaError):
                    full = timeout >= self.metadata_timeout_s
                    if no_broker_answered(err, full_timeout=full):
                        self.reachability.lost(f"a metadata request failed: {err.str()}")
                        break  # none of the others would be answered either
                    if err.code() == KafkaError._TIMED_OUT:
                        break  # the budget ran out: this one and the rest next time
                asked += 1
                continue
            asked += 1
            self.reachability.reached()
            self._note_exists(topic, meta)
            if topic in subscribed and meta is not None and meta.error is None and meta.partitions:
                counts[topic] = len(meta.partitions)
        self._ask_next = start + asked
        if counts == self.partition_counts:
            return
        for topic, n in counts.items():
            was = self.partition_counts.get(topic)
            if was is not None and was != n:
                log.warning("topic %s now has %d partitions (had %d)", topic, n, was)
        self.partition_counts = counts
        if self._on_partition_counts is not None:
            self._on_partition_counts(counts)

    def _note_exists(self, topic: str, meta: Any) -> None:
        """Count the metadata answers in a row that said ``topic`` does not exist."""
        absent = (
            meta is None
            or (meta.error is not None and meta.error.code() in _NO_TOPIC)
            or (meta.error is None and not meta.partitions)
        )
        if not absent:
            if self._absent.pop(topic, 0) >= VANISHED_AFTER:
                log.warning(
                    "topic %s exists again, created anew (what it held is gone): /healthz "
                    "still reports it, a restart is needed",
                    topic,
                )
            return
        n = self._absent[topic] = self._absent.get(topic, 0) + 1
        if n == VANISHED_AFTER and topic not in self._vanished:
            self._vanished = tuple(sorted({*self._vanished, topic}))
            log.error(
                "topic %s no longer exists on the cluster (deleted, or the broker lost its "
                "data): /healthz reports it until a restart, which creates it again",
                topic,
            )

    def _assigned(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.reachability.reached()
        self.access.allowed("group", str(self._conf.get("group.id")))
        self.access.allowed(SUBSCRIPTION, self._subscription)
        if self.group_problem is not None:
            log.info("the group took this worker in: %s", self.group_problem)
            self.group_problem = None
        self.assignment = sorted({*self.assignment, *((p.topic, p.partition) for p in partitions)})
        log.info("assigned %s", [(p.topic, p.partition) for p in partitions])
        if self._on_assignment:
            self._on_assignment(self.assignment)

    def _revoked(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = {(p.topic, p.partition) for p in partitions}
        dropped = self.batcher.discard(lambda r: (r.topic(), r.partition()) not in gone)
        wait_s = self._drain_left_s()
        if not self._wait_settled(wait_s):
            log.warning(
                "revocation: %d batches still in flight after %.1fs; their offsets, and those "
                "of every batch after them, will not be committed",
                self.in_flight,
                wait_s,
            )
        if self.exactly_once:
            # Nothing to commit here (the transactions did); a batch still in flight keeps
            # every offset it holds: its transaction commits them all or none (a late one is
            # refused by the group for its old generation, KIP-447), never its records alone.
            with self._idle:
                for tp in gone:
                    self._bases.pop(tp, None)
        else:
            self._commit(consumer)
            with self._idle:  # a batch delivered late stores nothing for partitions not ours
                self.checkpoint.revoke(gone)
        self.assignment = sorted(set(self.assignment) - gone)
        for tp in gone:
            self._positions.pop(tp, None)
        self.lag = {tp: n for tp, n in self.lag.items() if tp not in gone}
        log.info("revoked %s (%d waiting records dropped, to be re-read)", sorted(gone), dropped)
        if self._on_assignment:
            self._on_assignment(self.assignment)

    def _commit(self, consumer: Consumer) -> None:
        self._store_done(consumer)
        try:
            consumer.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                log.warning("commit failed: %s", exc.args[0].str())

    def _close(self, consumer: Consumer) -> None:
        """Wait for the batches in flight (until the stop's deadline), commit the delivered
        prefix, close. Every step is attempted: a failed commit still closes the consumer."""
        if self._drain_deadline is None:  # ended by itself (a failed batch, a fatal error)
            self._drain_deadline = time.monotonic() + self.drain_timeout_s
        self.batcher.flush()  # not handed off: re-read after restart
        try:
            if not self._wait_settled(self._drain_left_s()):
                log.warning(
                    "closing with %d batches in flight: their offsets, and those of every "
                    "batch after them, are not committed",
                    self.in_flight,
                )
            if not self.exactly_once:
                self._commit(consumer)
        finally:
            # close() revokes the assignment: _revoked waits within the same deadline.
            consumer.close()
