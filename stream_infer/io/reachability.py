"""Whether this worker's clients can reach the Kafka cluster, and since when they cannot.

Evidence of an outage: librdkafka's error callback saying every broker is down
(``_ALL_BROKERS_DOWN``, once when a client's last broker connection fails), and a metadata
request failing for want of a broker (:func:`no_broker_answered`: no broker up, a transport or
name-resolution error, or a timeout of a request that had its whole timeout: a request whose
timeout was cut short by a budget proves nothing when it times out). Evidence of the cluster:
a broker's fresh answer (metadata returned, a delivery acknowledged, an assignment, a fetch
that reached a partition's end). Every client talks to the same cluster, so any client's answer
clears the outage: an idle client (a producer with nothing to send) proves nothing either way.
While the mark stands the consumer thread and the control-log thread ask for metadata every
few seconds, which bounds how long a stale mark can last.

The mark is one tuple (since when, why), replaced whole: a reader on another thread sees both
of the same outage (:attr:`Reachability.mark`). The lines saying it was lost and regained are
logged once per kind and interval, with a count (:meth:`Reachability.flush_due`).

``/readyz`` answers 503 once the outage has lasted past ``limits.unreachable_grace_s``, and
``/healthz`` warns (200: a restart does not bring a cluster back).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from confluent_kafka import KafkaError

from stream_infer.io.repeated_log import RateLimitedLog

log = logging.getLogger(__name__)

# Error codes that mean no broker answered a request, whatever its timeout.
NO_BROKER = frozenset({KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._RESOLVE})
# Said by the error callback for each failed connection: librdkafka's log lines say them too.
_CONNECTION = frozenset({KafkaError._TRANSPORT, KafkaError._RESOLVE})


def no_broker_answered(err: KafkaError, *, full_timeout: bool) -> bool:
    """Whether a failed request is evidence of an outage: no broker up or reachable, or a
    timeout of a request that had its whole timeout (``full_timeout``). A request given what
    was left of a budget may time out on a slow but reachable cluster.

    >>> no_broker_answered(KafkaError(KafkaError._TIMED_OUT), full_timeout=False)
    False
    """
    code = err.code()
    return code in NO_BROKER or (code == KafkaError._TIMED_OUT and full_timeout)


class Reachability:
    """The cluster's reachability as this worker's clients see it. ``clock``: monotonic
    seconds (injected in tests). Any thread may report; reads are plain attribute reads."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        # (the clock's time the outage was first seen, why); None while reachable. Replaced
        # whole, never changed in place: one read gives both of the same outage.
        self.mark: tuple[float, str] | None = None
        self._errors = RateLimitedLog(log, clock=clock)
        self._changes = RateLimitedLog(log, clock=clock)  # the lost and regained lines

    @property
    def down_since(self) -> float | None:
        """The clock's time the outage was first seen (None: reachable)."""
        mark = self.mark
        return None if mark is None else mark[0]

    @property
    def why(self) -> str | None:
        mark = self.mark
        return None if mark is None else mark[1]

    def unreachable_for_s(self) -> float:
        """How long the cluster has been unreachable (0.0 while it is reachable)."""
        mark = self.mark
        return 0.0 if mark is None else max(0.0, self._clock() - mark[0])

    def outage(self) -> tuple[float, str] | None:
        """For how long (s) the cluster has been unreachable, and why, from one read of the
        mark (None while it is reachable)."""
        mark = self.mark
        return None if mark is None else (max(0.0, self._clock() - mark[0]), mark[1])

    def lost(self, why: str) -> None:
        """No broker answered a client (``why``: which, and what it said)."""
        if self.mark is not None:
            return
        with self._lock:
            if self.mark is not None:
                return
            self.mark = (self._clock(), why)
        self._changes.log(
            logging.ERROR,
            "lost",
            "Kafka unreachable: %s; the clients keep reconnecting (their connection errors are "
            "logged once per kind and interval, with a count)",
            why,
        )

    def reached(self) -> None:
        """A broker answered. Cheap when nothing was lost (called per answer)."""
        if self.mark is None:
            return
        with self._lock:
            mark, self.mark = self.mark, None
        if mark is not None:
            self._changes.log(
                logging.WARNING,
                "reached",
                "Kafka reachable again after %.1f s",
                max(0.0, self._clock() - mark[0]),
            )

    def flush_due(self) -> int:
        """Say the counts of lines suppressed (outages, client errors) whose interval passed
        (the report timer calls it). Returns the lines logged."""
        return self._changes.flush_due() + self._errors.flush_due()

    def error_cb(self, client: str) -> Callable[[KafkaError], None]:
        """A client's ``error_cb`` (served by the thread that polls it): every broker down is
        an outage; a connection error is left to the log lines that say it; anything else is
        logged, once per kind and interval."""

        def on_error(err: KafkaError) -> None:
            code = err.code()
            if code == KafkaError._ALL_BROKERS_DOWN:
                self.lost(f"no broker answers {client} ({err.str()})")
            elif code not in _CONNECTION:
                self._errors.log(logging.WARNING, (client, code), "%s: %s", client, err.str())

        return on_error
