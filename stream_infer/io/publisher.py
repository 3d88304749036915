"""Producing a batch's records and knowing when every one of them is acknowledged.

Each batch gets a :class:`Ticket`. A dedicated thread polls the producer, which runs the
delivery callbacks. A ticket completes only when all its records are acknowledged, and only
then may the batch's input offsets be committed; it fails (:class:`DeliveryError` from
:meth:`Ticket.delivered`) when one of its records can never be delivered.

What a failed delivery becomes depends on the error (:func:`classify`):

- *transient* (a leader moved, a broker down, not enough replicas): librdkafka retries these
  itself, in order (idempotent producer), until ``message.timeout.ms``; the workers' producer
  sets it to 0 (no limit, :func:`stream_infer.io.clients.producer_config`), so they do not
  come back. Where a finite timeout is configured, a record that timed out comes back and is
  produced again after ``retry_backoff_s``, for as long as it takes.
- *broken producer* (a fatal error; an idempotent producer fenced, unknown, out of sequence):
  retrying on it would retry forever. The poll thread replaces it with a new producer
  (librdkafka's advice for a fatal error), purges the old one, and produces everything that
  comes back again on the new one. (Seen on the embedded broker: once a message timed out,
  every later delivery of that producer fails with PRODUCER_FENCED.)
- *refused* (TOPIC_AUTHORIZATION_FAILED, from the broker or from ``produce()`` itself): noted
  once in :class:`AccessRefusals` (an ERROR line, a /healthz warning) and retried every
  ``refused_backoff_s`` until the permission is granted.
- *permanent* (the record is too large, INVALID_RECORD such as a null key on a compacted
  topic, an invalid argument, a topic unknown for longer than ``unknown_topic_timeout_s``: it
  was deleted): never retried. ``undeliverable`` (the runtime's hook) may give a record to
  deliver instead under the same ticket (a dead letter that keeps the record, reason
  ``undeliverable``). Without one (the dead letter itself refused for good) the record is set
  aside, its ticket fails and :attr:`Publisher.problem` says why, for ``/healthz``; so does a
  poll thread that died (every ticket would wait on it forever).

Order: records of one topic reach librdkafka in the order they were published, and librdkafka
keeps that order per partition through its own retries. When a record of a topic comes back
to be produced again, the topic takes no new record: later ones wait here, in order. Once
every record of the topic that was inside the producer has come back (delivered or not), the
failed ones are produced again in the order they came back, then the waiting ones. So a retry
or a producer replacement does not put a record behind a newer one of its key. What this
cannot order: librdkafka skips a record that timed out and goes on with the next, so with a
finite ``message.timeout.ms`` a record retried after a timeout may land after later ones.

:meth:`Publisher.publish` never blocks on the producer: a full local queue (BufferError) makes
the record wait here like the others, and the poll thread produces it once there is room
(polling in between: it is the only thread that serves the producer's callbacks).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from stream_infer.core.events import OutRecord
from stream_infer.errors import DeliveryError
from stream_infer.io.access import AccessRefusals, is_refusal
from stream_infer.io.clients import framed_size
from stream_infer.io.reachability import Reachability
from stream_infer.io.repeated_log import RateLimitedLog

log = logging.getLogger(__name__)

_RETIRED_GRACE_S = 5.0
# Errors after which this producer instance will not deliver again.
_BROKEN_PRODUCER = frozenset(
    {
        KafkaError._FATAL,
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.UNKNOWN_PRODUCER_ID,
        KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
        KafkaError.INVALID_PRODUCER_ID_MAPPING,
    }
)
# The topic or partition is not (yet) in the metadata: retried, for a while (a topic being
# created), then permanent (a deleted topic).
_UNKNOWN_TOPIC = frozenset(
    {KafkaError._UNKNOWN_TOPIC, KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_PARTITION}
)
# A delivery report with one of these fails the same way at every retry.
_PERMANENT = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.INVALID_REQUIRED_ACKS,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError.POLICY_VIOLATION,
        KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT,
        KafkaError.UNSUPPORTED_COMPRESSION_TYPE,
        KafkaError.INVALID_TIMESTAMP,
        KafkaError._INVALID_ARG,
    }
)
# Purged from a replaced producer: produced again at once.
PURGED = frozenset({KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT})


class Failure(Enum):
    """What a failed delivery becomes."""

    RETRY = "retry"  # produced again after a back-off
    BROKEN = "broken"  # the producer is replaced, then the record is produced again
    REFUSED = "refused"  # a permission is missing: retried slowly until granted
    PERMANENT = "permanent"  # never retried: dead-lettered, or its ticket fails


# A size refusal a delivery report gives every record of a batch (the broker judges the whole
# batch against max.message.bytes, and librdkafka never splits one).
BATCH_TOO_LARGE = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})


def classify(
    err: KafkaError,
    *,
    at_produce: bool = False,
    unknown_for_s: float = 0.0,
    unknown_topic_timeout_s: float = 60.0,
    fits_alone: bool = False,
) -> Failure:
    """What to do about ``err``. ``at_produce``: raised by ``produce()`` itself, where any
    error not known to be passing is permanent (the record never left); a delivery report's
    unknown error is retried. ``unknown_for_s``: how long the record's topic has been unknown
    (a topic deleted stays unknown). ``fits_alone``: the record with a batch's framing is
    within its topic's max.message.bytes, so a size refusal was its batch's (retried).

    >>> classify(KafkaError(KafkaError.NOT_ENOUGH_REPLICAS))
    <Failure.RETRY: 'retry'>
    >>> classify(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED))
    <Failure.REFUSED: 'refused'>
    >>> too_large = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)
    >>> classify(too_large), classify(too_large, fits_alone=True)
    (<Failure.PERMANENT: 'permanent'>, <Failure.RETRY: 'retry'>)
    """
    code = err.code()
    if code in BATCH_TOO_LARGE and fits_alone and not at_produce:
        return Failure.RETRY
    if code in _BROKEN_PRODUCER or err.fatal():
        return Failure.BROKEN
    if is_refusal(err):
        return Failure.REFUSED
    if code in _UNKNOWN_TOPIC:
        return Failure.PERMANENT if unknown_for_s > unknown_topic_timeout_s else Failure.RETRY
    if code in _PERMANENT or at_produce:
        return Failure.PERMANENT
    return Failure.RETRY


class Ticket:
    """Delivery state of one batch's records.

    Make it on the event loop's thread (it holds an asyncio future, or none when ``loop`` is
    None: records nothing awaits, such as drift events); delivery callbacks complete it from
    the publisher's thread.
    ``done``: every record acknowledged; ``error``: why one of them never will be.
    """

    __slots__ = (
        "_done",
        "_future",
        "_loop",
        "_on_settled",
        "error",
        "pending",
        "records",
        "rewound",
        "sent_at",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.pending = 0
        # What was published under it: a failed delivery finds its record (and the input
        # record it was made from) here; the callback only sees the bytes.
        self.records: Sequence[OutRecord] = ()
        self.error: DeliveryError | None = None
        # exactly_once: the batch's transaction was not committed (aborted, or skipped after
        # an aborted one): none of its records is visible, its input is read again.
        self.rewound = False
        self.sent_at = time.monotonic()
        self._done = threading.Event()
        self._loop = loop
        self._future: asyncio.Future[None] | None = loop.create_future() if loop else None
        self._on_settled: Callable[[Ticket], None] | None = None

    def find(self, topic: str, key: bytes | None, value: bytes) -> OutRecord:
        """The record published under this ticket with these bytes (a delivery callback gets
        only the bytes); a new one when there is none. A scan: failures only."""
        for record in self.records:
            if record.value == value and record.topic == topic and record.key == key:
                return record
        return OutRecord(topic, key, value)

    @property
    def done(self) -> bool:
        """Every record is acknowledged."""
        return self._done.is_set() and self.error is None

    async def delivered(self) -> None:
        """Wait, on the event loop, until every record is acknowledged. Raises
        :class:`DeliveryError` when one of them can never be delivered."""
        if self._future is None:
            msg = "this ticket was made without an event loop"
            raise RuntimeError(msg)
        await self._future

    def _expect(self, n: int) -> None:
        self.pending = n
        self.sent_at = time.monotonic()
        if n == 0:
            self._settle()

    def _acked(self) -> None:
        self.pending -= 1
        if self.pending == 0 and self.error is None:
            self._settle()

    def _rewind(self) -> None:
        """exactly_once: nothing of the batch was committed; it is read and served again."""
        if self._done.is_set():
            return
        self.rewound = True
        self._settle()

    def _fail(self, error: DeliveryError) -> None:
        if self._done.is_set():
            return
        self.error = error
        self._settle()

    def _settle(self) -> None:
        self._done.set()
        if self._on_settled is not None:
            self._on_settled(self)
        if self._loop is not None and self._future is not None:
            self._loop.call_soon_threadsafe(_resolve, self._future, self.error)


def _resolve(future: asyncio.Future[None], error: DeliveryError | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


Pending = tuple[OutRecord, Ticket]


class _Topic:
    """The publisher's state for one topic (guarded by the publisher's lock, except
    ``returned``, which only the poll thread writes)."""

    __slots__ = ("due", "failed", "held", "produced", "refused", "returned", "unknown_since")

    def __init__(self) -> None:
        self.failed: deque[Pending] = deque()  # came back from the producer, in that order
        self.held: deque[Pending] = deque()  # published while the topic waited, in order
        self.due = 0.0  # not produced again before (monotonic)
        self.refused = False  # the last failure was a missing permission
        self.unknown_since: float | None = None  # unknown to the metadata since (monotonic)
        self.produced = 0  # handed to a producer
        self.returned = 0  # delivery reports served

    @property
    def waiting(self) -> int:
        return len(self.failed) + len(self.held)


class Publisher:
    """A confluent-kafka producer with per-batch delivery tickets, retries in order, and
    a classified end for what can never be delivered."""

    def __init__(
        self,
        conf: dict[str, Any],
        *,
        retry_backoff_s: float = 0.5,
        refused_backoff_s: float = 5.0,
        unknown_topic_timeout_s: float = 60.0,
        on_retry: Callable[[str, str], None] | None = None,
        undeliverable: Callable[[OutRecord, str], OutRecord | None] | None = None,
        rebuild_interval_s: float = 1.0,
        access: AccessRefusals | None = None,
        max_message_bytes: Mapping[str, int] | None = None,
        reachability: Reachability | None = None,
    ) -> None:
        self._conf = conf
        # A delivery acknowledged is the cluster answering.
        self.reachability = reachability if reachability is not None else Reachability()
        self._repeats = RateLimitedLog(log)
        # Each topic's max.message.bytes, as known at start (missing: not known).
        self._max_message_bytes = dict(max_message_bytes or {})
        self.access = access if access is not None else AccessRefusals()
        self._lock = threading.Lock()  # the producer swap, the topics' queues, produce calls
        self._producer = Producer(conf)
        # Replaced producers (and when), polled and purged until their queues are empty.
        self._retired: list[tuple[float, Producer]] = []
        self._broken = threading.Event()
        self._rebuilt_at = 0.0
        self.rebuild_interval_s = rebuild_interval_s
        self.rebuilds = 0
        self.retry_backoff_s = retry_backoff_s
        self.refused_backoff_s = refused_backoff_s
        self.unknown_topic_timeout_s = unknown_topic_timeout_s
        self._on_retry = on_retry
        self._undeliverable = undeliverable
        self._topics: dict[str, _Topic] = {}
        # Records nothing could deliver (their tickets failed), and why.
        self._set_aside: list[tuple[OutRecord, str]] = []
        # Tickets not settled yet, oldest first (for the age of the oldest).
        self._open: dict[int, Ticket] = {}
        self._open_lock = threading.Lock()
        # Topics delivered to since the last poll while something was refused (poll thread).
        self._delivered_topics: set[str] = set()
        self._failure: str | None = None  # why the poll thread died
        self._stopping = threading.Event()
        self._stop_deadline = 0.0
        self._thread = threading.Thread(target=self._poll_loop, name="publisher-poll", daemon=True)
        self._thread.start()

    # --- publishing (any thread) ---------------------------------------------------------

    def publish(self, records: Sequence[OutRecord], ticket: Ticket) -> None:
        """Queue every record for delivery under the ticket. Never blocks on the producer;
        safe from several threads (records of one call keep their order)."""
        self._track(ticket)
        ticket.records = records
        ticket._expect(len(records))
        # One callback per batch and topic, not per record.
        callbacks: dict[str, tuple[_Topic, Callable[[KafkaError | None, Message], None]]] = {}
        with self._lock:
            broken = self._broken.is_set()
            produce = self._producer.produce
            for record in records:  # the hot path: _submit inlined
                topic = record.topic
                found = callbacks.get(topic)
                if found is None:
                    state = self._topic(topic)
                    found = callbacks[topic] = (state, self._callback(ticket, state))
                state, on_delivery = found
                if broken or state.failed or state.held:
                    state.held.append((record, ticket))
                    continue
                try:
                    produce(topic, record.value, record.key, on_delivery=on_delivery)
                except (BufferError, KafkaException) as exc:
                    if not self._not_produced(record, ticket, state, exc):
                        state.held.append((record, ticket))
                    broken = self._broken.is_set()
                    continue
                state.produced += 1

    def _track(self, ticket: Ticket) -> None:
        ticket._on_settled = self._untrack
        with self._open_lock:
            self._open[id(ticket)] = ticket

    def _untrack(self, ticket: Ticket) -> None:
        with self._open_lock:
            self._open.pop(id(ticket), None)

    @property
    def oldest_unacked_s(self) -> float:
        """How long the oldest ticket not yet settled has waited (0 when none)."""
        with self._open_lock:
            oldest = next(iter(self._open.values()), None)
        return 0.0 if oldest is None else max(0.0, time.monotonic() - oldest.sent_at)

    def _topic(self, name: str) -> _Topic:
        state = self._topics.get(name)
        if state is None:
            state = self._topics[name] = _Topic()
        return state

    def _submit(
        self,
        record: OutRecord,
        ticket: Ticket,
        state: _Topic | None = None,
        on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
    ) -> None:
        """Produce the record now, or make it wait behind its topic's (lock held)."""
        if state is None:
            state = self._topic(record.topic)
        if on_delivery is None:
            on_delivery = self._callback(ticket, state)
        if state.failed or state.held or self._broken.is_set():
            state.held.append((record, ticket))
            return
        if not self._produce(record, ticket, on_delivery, state):
            state.held.append((record, ticket))

    def _produce(
        self,
        record: OutRecord,
        ticket: Ticket,
        on_delivery: Callable[[KafkaError | None, Message], None],
        state: _Topic,
    ) -> bool:
        """Hand the record to the producer (lock held). False: it must wait (the local queue
        is full, or produce() refused it for now); a permanent refusal is dealt with here."""
        try:
            self._producer.produce(record.topic, record.value, record.key, on_delivery=on_delivery)
        except (BufferError, KafkaException) as exc:
            return self._not_produced(record, ticket, state, exc)
        state.produced += 1
        return True

    def _not_produced(
        self, record: OutRecord, ticket: Ticket, state: _Topic, exc: BufferError | KafkaException
    ) -> bool:
        """produce() raised. False: the record must wait (the local queue is full: the poll
        thread drains it, then produces it; or a refusal for now); True: a permanent refusal,
        dealt with (dead-lettered, or set aside)."""
        if isinstance(exc, BufferError):
            state.due = min(state.due, time.monotonic())
            return False
        err: KafkaError = exc.args[0]
        kind = self._note_failure(record, ticket, err, state, at_produce=True)
        if kind is Failure.PERMANENT:
            self._permanent(record, ticket, err)
            return True
        return False

    def _callback(
        self, ticket: Ticket, known: _Topic | None = None
    ) -> Callable[[KafkaError | None, Message], None]:
        """The delivery callback of a ticket's records of one topic (``known``: its state;
        None: looked up per record)."""

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            state = known
            if state is None:
                with self._lock:
                    state = self._topic(msg.topic() or "")
            state.returned += 1  # the poll thread only
            if err is None:
                if self.reachability.down_since is not None:
                    self.reachability.reached()
                if self.access.active:  # noted per poll, not per record (a lock each)
                    self._delivered_topics.add(msg.topic() or "")
                if state.unknown_since is not None:
                    state.unknown_since = None
                ticket._acked()
                return
            record = ticket.find(msg.topic() or "", msg.key(), msg.value() or b"")
            with self._lock:
                kind = self._note_failure(record, ticket, err, state)
                if kind is Failure.PERMANENT:
                    self._permanent(record, ticket, err)
                else:
                    state.failed.append((record, ticket))

        return on_delivery

    def _note_failure(
        self,
        record: OutRecord,
        ticket: Ticket,
        err: KafkaError,
        state: _Topic,
        *,
        at_produce: bool = False,
    ) -> Failure:
        """Classify a failure, count it, and set when its topic may be produced to again."""
        now = time.monotonic()
        if self._on_retry:
            self._on_retry(record.topic, err.name())
        if err.code() in _UNKNOWN_TOPIC and state.unknown_since is None:
            state.unknown_since = now
        limit = self._max_message_bytes.get(record.topic)
        size = framed_size(record.key, record.value)
        kind = classify(
            err,
            at_produce=at_produce,
            unknown_for_s=now - state.unknown_since if state.unknown_since is not None else 0.0,
            unknown_topic_timeout_s=self.unknown_topic_timeout_s,
            fits_alone=limit is not None and size <= limit,
        )
        if kind is Failure.PERMANENT:
            return kind
        first = not state.waiting
        state.refused = kind is Failure.REFUSED
        if kind is Failure.BROKEN:
            self._broken.set()
        if kind is Failure.REFUSED:
            # Logged once per topic, not per record and retry; retried slowly until granted.
            self.access.refused("topic", record.topic, "Write", err.name())
            state.due = max(state.due, now + self.refused_backoff_s)
        elif err.code() in PURGED:
            state.due = max(state.due, now)
        else:
            state.due = max(state.due, now + self.retry_backoff_s)
            if first:
                self._repeats.log(
                    logging.WARNING,
                    (record.topic, err.code()),
                    "delivery to %s failed (%s); its records are produced again, in order",
                    record.topic,
                    err.str(),
                )
        return kind

    def _permanent(self, record: OutRecord, ticket: Ticket, err: KafkaError) -> None:
        """A record no retry delivers: deliver its replacement under the same ticket, or set
        it aside and fail the ticket (lock held)."""
        why = (
            f"topic {record.topic!r} refused a {len(record.value)}-byte record for good "
            f"({err.name()}: {err.str()})"
        )
        replacement = None
        if self._undeliverable is not None:
            try:
                replacement = self._undeliverable(record, why)
            except Exception:  # a bug in the hook must not kill the poll thread
                log.exception("no replacement for an undeliverable record")
        if replacement is not None and replacement.topic != record.topic:
            log.error("%s; a dead letter keeps it on %s", why, replacement.topic)
            self._submit(replacement, ticket)
            return
        why += "; nothing else could take it"
        if not self._set_aside:
            log.error("%s: its batch fails and is never committed (fix the cause)", why)
        self._set_aside.append((record, why))
        ticket._fail(DeliveryError(why, topic=record.topic, key=record.key))

    @property
    def problem(self) -> str | None:
        """Why this publisher cannot deliver what it was given (None while it can)."""
        if self._failure is not None:
            return self._failure
        if self._set_aside:
            n = len(self._set_aside)
            return f"{self._set_aside[0][1]} ({n} record{'s' if n > 1 else ''} set aside)"
        if not self._thread.is_alive() and not self._stopping.is_set():
            return "the publisher's poll thread is not running"
        return None

    # --- the poll thread -------------------------------------------------------------------

    def _poll_loop(self) -> None:
        try:
            self._poll_until_stopped()
        except Exception as exc:
            # Every ticket would wait forever: say so (/healthz fails), do not die silently.
            self._failure = f"the publisher's poll thread died: {exc!r}"
            log.critical(
                "the publisher's poll thread died; nothing more is delivered", exc_info=True
            )

    def _poll_until_stopped(self) -> None:
        last_try = False
        while not self._stopping.is_set() or len(self):
            self._producer.poll(0.05)
            self._repeats.flush_due()
            self._poll_retired()
            self._note_delivered()
            now = time.monotonic()
            if self._broken.is_set() and now - self._rebuilt_at >= self.rebuild_interval_s:
                self._rebuild(now)
            if self._stopping.is_set() and not last_try:
                # Closing: a permission granted since the last attempt delivers them now.
                last_try = True
                with self._lock:
                    for state in self._topics.values():
                        if state.refused:
                            state.due = now
            if not self._broken.is_set():
                with self._lock:
                    self._release(now)
            if self._stopping.is_set() and (self._stop_deadline < now or self._only_refused()):
                break  # out of time, or all that is left waits for a permission

    def _release(self, now: float) -> None:
        """Produce the waiting records of every topic that is due (lock held): those that
        came back first, once nothing of the topic is left inside a producer, then the held
        ones; all in order, stopping at the first that must wait again."""
        for state in list(self._topics.values()):
            if not state.waiting or state.due > now:
                continue
            if state.failed and state.produced > state.returned:
                continue  # earlier records of the topic may still come back: they go first
            if self._release_topic(state):
                state.refused = False

    def _release_topic(self, state: _Topic) -> bool:
        """Produce a topic's waiting records in order (lock held); False at the first that
        must wait again (it and those behind it stay, in order)."""
        for queue in (state.failed, state.held):
            while queue:
                record, ticket = queue.popleft()
                if not self._produce(record, ticket, self._callback(ticket, state), state):
                    queue.appendleft((record, ticket))
                    return False
        return True

    def _only_refused(self) -> bool:
        """Everything not delivered waits for a permission (nothing else will move)."""
        with self._lock:
            waiting = sum(s.waiting for s in self._topics.values())
            refused = sum(s.waiting for s in self._topics.values() if s.refused)
        return waiting == refused and len(self) == waiting

    def _note_delivered(self) -> None:
        """Topics delivered to again are granted Write (one lock per topic and poll)."""
        if self._delivered_topics:
            topics, self._delivered_topics = self._delivered_topics, set()
            for topic in topics:
                self.access.allowed("topic", topic, "Write")

    def _rebuild(self, now: float) -> None:
        """Replace a producer that can no longer deliver (poll thread only); what it still
        holds comes back now (purged) and is produced again on the new one, in order."""
        with self._lock:
            self._broken.clear()
            self._rebuilt_at = now
            old, self._producer = self._producer, Producer(self._conf)
        self._retired.append((now, old))
        self.rebuilds += 1
        log.error(
            "the producer can no longer deliver (fatal error or fenced); replaced it "
            "(%d records to produce again)",
            len(old),
        )
        old.purge()
        old.poll(0)

    def _poll_retired(self) -> None:
        """Purge what the replaced producers still hold: their callbacks queue it to be
        produced again on the new producer. A replaced producer is kept for a grace period,
        for a delivery report it serves late."""
        now = time.monotonic()
        for entry in list(self._retired):
            retired_at, old = entry
            old.purge()
            old.poll(0)
            if len(old) == 0 and now - retired_at > _RETIRED_GRACE_S:
                self._retired.remove(entry)

    def close(self, timeout_s: float = 30.0) -> int:
        """Deliver what is queued (up to the timeout), stop polling; return records left."""
        self._stop_deadline = time.monotonic() + timeout_s
        self._stopping.set()
        self._thread.join(timeout_s + 1.0)
        left = len(self) + len(self._set_aside)
        if left:
            log.error("%d records were not delivered before shutdown", left)
        return left

    def __len__(self) -> int:
        """Records queued in the producers or waiting to be produced (again)."""
        retired = sum(len(old) for _, old in self._retired)
        waiting = sum(s.waiting for s in list(self._topics.values()))
        return len(self._producer) + retired + waiting
