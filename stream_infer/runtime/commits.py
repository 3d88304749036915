"""Commit after delivery, in order: the worker's promise about input offsets.

An input offset is stored for commit only once every record produced for it, and for every
input record before it, is acknowledged by the broker; never at or past a batch that failed.
:class:`OrderedCommits` keeps that promise on the event loop, over two parts in io/:

- the batch source's :class:`~stream_infer.io.checkpoint.Checkpoint` numbers the batches as
  they are handed out, latches on a failed one, and releases the offsets of the longest
  delivered prefix (pure, no asyncio);
- each batch's :class:`~stream_infer.io.publisher.Ticket` is completed by the publisher's
  delivery reports (or fails with the reason a record can never be delivered).

Here each served batch is queued with its ticket, the tickets are awaited in the order the
batches were handed out, and each batch is handed back to the source: ``done`` (its offsets
may be stored) once delivered, ``fail`` when it cannot be served or delivered. Under exactly_once
a ticket completes when the batch's transaction commits (its offsets with it), or is
*rewound* when it was not (aborted, or read before a rewind): ``dropped``, its records come
again. A failed batch
stops the commits: nothing after it is served, marked done or committed, and the worker
restarts from the committed offsets.

Kept apart from the checkpoint because it awaits asyncio futures (the tickets) and measures
delivery time; the checkpoint decides, this drives it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from stream_infer.errors import DeliveryError
from stream_infer.io.publisher import Ticket
from stream_infer.io.source import SourceBatch
from stream_infer.runtime.kafka import KafkaClients


class OrderedCommits:
    """The served batches waiting for delivery, in order, and their hand-back to the source.

    ``kafka.source``: the batch source, once started. ``on_delivered``: each batch's delivery
    time in seconds (from its records' produce call to the last acknowledgement).
    """

    def __init__(self, kafka: KafkaClients, on_delivered: Callable[[float], None]) -> None:
        self._kafka = kafka
        self._on_delivered = on_delivered
        self._waiting: asyncio.Queue[tuple[SourceBatch, Ticket]] = asyncio.Queue()

    @property
    def failure(self) -> str | None:
        """Why the first failed batch failed (None while none did): nothing is served after."""
        source = self._kafka.source
        return source.failure if source is not None else None

    @staticmethod
    def ticket() -> Ticket:
        """A new ticket for one batch's records (made on the event loop: it holds a future)."""
        return Ticket(asyncio.get_running_loop())

    async def add(self, batch: SourceBatch, ticket: Ticket) -> None:
        """``batch`` is served and its records published under ``ticket``: commit it once
        they are delivered, after every batch added before."""
        await self._waiting.put((batch, ticket))

    def fail(self, batch: SourceBatch, reason: str) -> None:
        """``batch`` cannot be served: nothing at or after it is committed."""
        assert self._kafka.source is not None
        self._kafka.source.fail(batch, reason)

    def __len__(self) -> int:
        """Batches added and not yet taken for commit."""
        return self._waiting.qsize()

    async def run(self) -> None:
        """Forever: wait for each batch's delivery, in order, then mark it done (the source
        stores its offsets). Raises :class:`DeliveryError` once a batch's record can never
        be delivered: the batch failed, nothing after it is committed."""
        source = self._kafka.source
        assert source is not None
        while True:
            batch, ticket = await self._waiting.get()
            try:
                await ticket.delivered()
            except DeliveryError as exc:
                source.fail(batch, f"a record cannot be delivered: {exc}")
                raise
            if ticket.rewound:  # exactly_once: aborted, or after an aborted one; read again
                source.dropped(batch)
                continue
            self._on_delivered(time.monotonic() - ticket.sent_at)
            source.done(batch)
