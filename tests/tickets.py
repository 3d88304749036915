"""Waiting in a test for a publisher's ticket to settle (the runtime awaits
:meth:`~stream_infer.io.publisher.Ticket.delivered` on its event loop instead)."""

from __future__ import annotations

import time

from stream_infer.io.publisher import Ticket


def settled(ticket: Ticket, timeout_s: float) -> bool:
    """Whether ``ticket`` settled within ``timeout_s``: every record acknowledged
    (``ticket.done``), or one that never will be (``ticket.error``)."""
    deadline = time.monotonic() + timeout_s
    while not (ticket.done or ticket.error is not None):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.001)
    return True
