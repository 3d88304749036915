"""Producing a batch's records and knowing when every one of them is acknowledged.

Each batch gets a :class:`Ticket`. A dedicated thread polls the producer, which runs the
delivery callbacks; a record whose delivery fails is produced again after a back-off, for as
long as it takes. A ticket is complete only when all its records are acknowledged, and only
then may the batch's input offsets be committed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from stream_infer.events import OutRecord

log = logging.getLogger(__name__)


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
        on_retry: Callable[[str, str], None] | None = None,
    ) -> None:
        self._producer = Producer(conf)
        self.retry_backoff_s = retry_backoff_s
        self._on_retry = on_retry
        self._retries: deque[tuple[float, OutRecord, Ticket]] = deque()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._poll_loop, name="publisher-poll", daemon=True)
        self._thread.start()

    def publish(self, records: Sequence[OutRecord], ticket: Ticket) -> None:
        """Queue every record for delivery under the ticket. Safe from any one thread."""
        ticket._expect(len(records))
        on_delivery = self._callback(ticket)  # one callback per batch, not per record
        for record in records:
            self._produce(record.topic, record.value, record.key, on_delivery)

    def _callback(self, ticket: Ticket) -> Callable[[KafkaError | None, Message], None]:
        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            if err is None:
                ticket._acked()
                return
            ticket.failures += 1
            topic = msg.topic() or ""
            retry = OutRecord(topic, msg.key(), msg.value() or b"")
            self._retries.append((time.monotonic() + self.retry_backoff_s, retry, ticket))
            if self._on_retry:
                self._on_retry(topic, err.name())
            log.warning("delivery to %s failed (%s); retrying", topic, err.str())

        return on_delivery

    def _produce(
        self,
        topic: str,
        value: bytes,
        key: bytes | None,
        on_delivery: Callable[[KafkaError | None, Message], None],
    ) -> None:
        while True:
            try:
                self._producer.produce(topic, value, key, on_delivery=on_delivery)
                return
            except BufferError:  # the local queue is full: let the poll thread drain it
                time.sleep(0.005)

    def _poll_loop(self) -> None:
        while not self._stopping.is_set() or len(self._producer) or self._retries:
            self._producer.poll(0.05)
            now = time.monotonic()
            while self._retries and self._retries[0][0] <= now:
                _, record, ticket = self._retries.popleft()
                self._produce(record.topic, record.value, record.key, self._callback(ticket))
            if self._stopping.is_set() and self._stop_deadline < now:
                break

    _stop_deadline = 0.0

    def close(self, timeout_s: float = 30.0) -> int:
        """Deliver what is queued (up to the timeout), stop polling; return records left."""
        self._stop_deadline = time.monotonic() + timeout_s
        self._stopping.set()
        self._thread.join(timeout_s + 1.0)
        left = len(self._producer) + len(self._retries)
        if left:
            log.error("%d records were not delivered before shutdown", left)
        return left

    def __len__(self) -> int:
        """Records queued in the producer or waiting for a retry."""
        return len(self._producer) + len(self._retries)
