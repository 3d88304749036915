"""Producing a batch's records and knowing when every one of them is acknowledged.

Each batch gets a :class:`Ticket`. A dedicated thread polls the producer, which runs the
delivery callbacks; a record whose delivery fails is produced again after a back-off, for as
long as it takes. A ticket is complete only when all its records are acknowledged, and only
then may the batch's input offsets be committed.

Some failures mean the producer itself can no longer deliver: a fatal error, or an idempotent
producer whose identity the broker refuses (fenced, unknown, out of sequence). Retrying on it
would retry forever, so the poll thread replaces it with a new producer and purges the old
one; the purged records come back through their callbacks and are produced again on the new
one. (Seen on the embedded broker: once a message timed out, every later delivery of that
producer fails with PRODUCER_FENCED. librdkafka's advice for a fatal error is the same: make a
new producer.)

A topic the worker's principal may not write to (TOPIC_AUTHORIZATION_FAILED, from the broker
or, once librdkafka's metadata knows it, from ``produce()`` itself) is noted once in
:class:`AccessRefusals` (an ERROR line, a /healthz warning) and its records are retried every
``refused_backoff_s`` until the permission is granted.

``produce()`` may refuse a record for other reasons. A missing topic or partition, or a broken
producer, is retried like a failed delivery. Anything else (a record over
``message.max.bytes``: MSG_SIZE_TOO_LARGE) would fail the same way at every retry: the record
is set aside, its ticket never completes (no offset is committed past it), and
:attr:`Publisher.problem` says why, for ``/healthz``. So does a poll thread that died: every
ticket would wait on it forever.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from stream_infer.events import OutRecord
from stream_infer.io.access import AccessRefusals, is_refusal

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
# What produce() itself may raise that a later attempt can get past: the topic or partition is
# not (yet) in librdkafka's metadata, or the producer must be replaced. A refusal (an ACL) is
# retried too, slowly (is_refusal).
_RETRIABLE_AT_PRODUCE = frozenset(
    {
        KafkaError._UNKNOWN_TOPIC,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_PARTITION,
    }
)


class Ticket:
    """Delivery state of one batch's records.

    Make it on the event loop's thread (it holds an asyncio future, or none when ``loop`` is
    None, for synchronous use); delivery callbacks complete it from the publisher's thread.
    """

    __slots__ = ("_done", "_future", "_loop", "failures", "pending", "sent_at")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.pending = 0
        self.failures = 0
        self.sent_at = time.monotonic()
        self._done = threading.Event()
        self._loop = loop
        self._future: asyncio.Future[None] | None = loop.create_future() if loop else None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout_s: float | None = None) -> bool:
        return self._done.wait(timeout_s)

    async def delivered(self) -> None:
        """Wait, on the event loop, until every record is acknowledged."""
        if self._future is None:
            msg = "this ticket was made without an event loop"
            raise RuntimeError(msg)
        await self._future

    def _expect(self, n: int) -> None:
        self.pending = n
        self.sent_at = time.monotonic()
        if n == 0:
            self._complete()

    def _acked(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            self._complete()

    def _complete(self) -> None:
        self._done.set()
        if self._loop is not None and self._future is not None:
            self._loop.call_soon_threadsafe(_resolve, self._future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Publisher:
    """A confluent-kafka producer with per-batch delivery tickets and endless retries."""

    def __init__(
        self,
        conf: dict[str, Any],
        *,
        retry_backoff_s: float = 0.5,
        refused_backoff_s: float = 5.0,
        on_retry: Callable[[str, str], None] | None = None,
        rebuild_interval_s: float = 1.0,
        access: AccessRefusals | None = None,
    ) -> None:
        self._conf = conf
        self.access = access if access is not None else AccessRefusals()
        self._producer = Producer(conf)
        # Replaced producers (and when), polled and purged until their queues are empty.
        self._retired: list[tuple[float, Producer]] = []
        self._broken = threading.Event()
        self._rebuilt_at = 0.0
        self.rebuild_interval_s = rebuild_interval_s
        self.rebuilds = 0
        self.retry_backoff_s = retry_backoff_s
        self.refused_backoff_s = refused_backoff_s
        self._on_retry = on_retry
        # Records to produce again, each queue in order of when they are due: one per back-off
        # (a refused record waiting 5 s must not hold up the others behind it).
        self._retries: deque[tuple[float, OutRecord, Ticket]] = deque()
        self._refused_retries: deque[tuple[float, OutRecord, Ticket]] = deque()
        # Records produce() refused for good (their tickets stay pending), and why.
        self._undeliverable: list[tuple[OutRecord, Ticket, str]] = []
        # Topics delivered to since the last poll while something was refused (poll thread).
        self._delivered_topics: set[str] = set()
        self._failure: str | None = None  # why the poll thread died
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._poll_loop, name="publisher-poll", daemon=True)
        self._thread.start()

    def publish(self, records: Sequence[OutRecord], ticket: Ticket) -> None:
        """Queue every record for delivery under the ticket. Safe from any one thread."""
        ticket._expect(len(records))
        on_delivery = self._callback(ticket)  # one callback per batch, not per record
        for record in records:
            self._produce(record, ticket, on_delivery)

    def _callback(self, ticket: Ticket) -> Callable[[KafkaError | None, Message], None]:
        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            if err is None:
                if self.access.active:  # noted per poll, not per record (a lock each)
                    self._delivered_topics.add(msg.topic() or "")
                ticket._acked()
                return
            self._failed(OutRecord(msg.topic() or "", msg.key(), msg.value() or b""), ticket, err)

        return on_delivery

    def _failed(self, record: OutRecord, ticket: Ticket, err: KafkaError) -> None:
        """A record was not delivered: count it, and produce it again after a back-off."""
        ticket.failures += 1
        if err.code() in _BROKEN_PRODUCER or err.fatal():
            self._broken.set()
        if self._on_retry:
            self._on_retry(record.topic, err.name())
        if is_refusal(err):
            # Logged once per topic, not per record and retry; retried slowly until granted.
            self.access.refused("topic", record.topic, "Write", err.name())
            due = time.monotonic() + self.refused_backoff_s
            self._refused_retries.append((due, record, ticket))
            return
        log.warning("delivery to %s failed (%s); retrying", record.topic, err.str())
        self._retries.append((time.monotonic() + self.retry_backoff_s, record, ticket))

    def _produce(
        self,
        record: OutRecord,
        ticket: Ticket,
        on_delivery: Callable[[KafkaError | None, Message], None],
    ) -> None:
        while True:
            try:
                self._producer.produce(
                    record.topic, record.value, record.key, on_delivery=on_delivery
                )
                return
            except BufferError:  # the local queue is full: let the poll thread drain it
                time.sleep(0.005)
            except KafkaException as exc:
                # Refused before it left. Raising here would kill the caller's thread (the
                # poll thread, for a retry: every later delivery would stall).
                err: KafkaError = exc.args[0]
                if (
                    is_refusal(err)
                    or err.code() in _RETRIABLE_AT_PRODUCE
                    or err.code() in _BROKEN_PRODUCER
                    or err.fatal()
                ):
                    self._failed(record, ticket, err)
                else:
                    self._set_aside(record, ticket, err)
                return

    def _set_aside(self, record: OutRecord, ticket: Ticket, err: KafkaError) -> None:
        """produce() refused a record for a reason no retry gets past: keep it (its ticket
        pending) and say so, once, instead of retrying it forever."""
        ticket.failures += 1
        if self._on_retry:
            self._on_retry(record.topic, err.name())
        why = (
            f"produce() refused a {len(record.value)}-byte record for topic {record.topic!r} "
            f"({err.name()}: {err.str()}); it is not retried and its batch is never committed"
        )
        if not self._undeliverable:
            log.error("%s (fix the cause and restart)", why)
        self._undeliverable.append((record, ticket, why))

    @property
    def problem(self) -> str | None:
        """Why this publisher cannot deliver what it was given (None while it can)."""
        if self._failure is not None:
            return self._failure
        if self._undeliverable:
            n = len(self._undeliverable)
            return f"{self._undeliverable[0][2]} ({n} record{'s' if n > 1 else ''} set aside)"
        if not self._thread.is_alive() and not self._stopping.is_set():
            return "the publisher's poll thread is not running"
        return None

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
            self._poll_retired()
            self._note_delivered()
            now = time.monotonic()
            if self._broken.is_set() and now - self._rebuilt_at >= self.rebuild_interval_s:
                self._rebuild(now)
            if self._stopping.is_set() and not last_try:
                # Closing: a permission granted since the last attempt delivers them now.
                last_try = True
                refused = self._refused_retries
                for _ in range(len(refused)):
                    _, record, ticket = refused.popleft()
                    refused.append((now, record, ticket))
            for retries in (self._retries, self._refused_retries):
                while retries and retries[0][0] <= now:
                    _, record, ticket = retries.popleft()
                    self._produce(record, ticket, self._callback(ticket))
            stuck = len(self._refused_retries) + len(self._undeliverable)
            if self._stopping.is_set() and (self._stop_deadline < now or len(self) == stuck):
                break  # out of time, or all that is left waits for a permission or a fix

    _stop_deadline = 0.0

    def _note_delivered(self) -> None:
        """Topics delivered to again are granted Write (one lock per topic and poll)."""
        if self._delivered_topics:
            topics, self._delivered_topics = self._delivered_topics, set()
            for topic in topics:
                self.access.allowed("topic", topic, "Write")

    def _rebuild(self, now: float) -> None:
        """Replace a producer that can no longer deliver (poll thread only)."""
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

    def _poll_retired(self) -> None:
        """Purge what the replaced producers still hold: their callbacks queue it for a retry
        on the new producer. A record that another thread produced on one of them just after
        the swap is caught by a later purge: a replaced producer is kept for a grace period."""
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
        left = len(self)
        if left:
            log.error("%d records were not delivered before shutdown", left)
        return left

    def __len__(self) -> int:
        """Records queued in the producers or waiting for a retry."""
        retired = sum(len(old) for _, old in self._retired)
        retries = len(self._retries) + len(self._refused_retries)
        return len(self._producer) + retired + retries + len(self._undeliverable)
