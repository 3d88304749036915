"""Whether this worker's clients can reach the Kafka cluster, and since when they cannot.

Evidence of an outage: librdkafka's error callback saying every broker is down
(``_ALL_BROKERS_DOWN``, once when a client's last broker connection fails), and the consumer
thread's metadata request failing for want of a broker (:data:`UNREACHABLE`). Evidence of the
cluster: anything a broker answered (records fetched, a delivery acknowledged, metadata
returned, an assignment). Every client talks to the same cluster, so any client's answer
clears the outage: an idle client (a producer with nothing to send) proves nothing either way.
The consumer thread asks for metadata every few seconds (its partition counts), which bounds
how long a stale mark can last.

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

# Error codes that mean no broker answered (a metadata request, the error callback).
UNREACHABLE = frozenset(
    {
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._TRANSPORT,
        KafkaError._TIMED_OUT,
        KafkaError._RESOLVE,
    }
)
# Said by the error callback for each failed connection: librdkafka's log lines say them too.
_CONNECTION = frozenset({KafkaError._TRANSPORT, KafkaError._RESOLVE})


class Reachability:
    """The cluster's reachability as this worker's clients see it. ``clock``: monotonic
    seconds (injected in tests). Any thread may report; reads are plain attribute reads."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.down_since: float | None = None  # the clock's time the outage was first seen
        self.why: str | None = None
        self._errors = RateLimitedLog(log)

    def unreachable_for_s(self) -> float:
        """How long the cluster has been unreachable (0.0 while it is reachable)."""
        since = self.down_since
        return 0.0 if since is None else max(0.0, self._clock() - since)

    def lost(self, why: str) -> None:
        """No broker answered a client (``why``: which, and what it said)."""
        if self.down_since is not None:
            return
        with self._lock:
            if self.down_since is not None:
                return
            self.down_since, self.why = self._clock(), why
        log.error(
            "Kafka unreachable: %s; the clients keep reconnecting (their connection errors are "
            "logged once per kind and interval, with a count)",
            why,
        )

    def reached(self) -> None:
        """A broker answered. Cheap when nothing was lost (called per fetched chunk)."""
        if self.down_since is None:
            return
        with self._lock:
            since, self.down_since, self.why = self.down_since, None, None
        if since is not None:
            log.warning("Kafka reachable again after %.1f s", max(0.0, self._clock() - since))

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
