"""What Kafka refuses this worker: permissions its principal lacks (ACLs), each reported once.

An authorization error is not transient the way a lost connection is: librdkafka keeps
retrying, but nothing changes until someone grants the permission. So the first refusal of a
resource is logged once, at ERROR, naming the resource, the broker's error and the permission
to grant; it stays a ``/healthz`` warning (not a failure: a restart never grants a permission)
and counts in ``stream_infer_kafka_access_refused`` until the resource is used successfully
again, which is logged too. Retries stay silent in between: a refused topic must not flood the
log with one warning per record and retry.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import KafkaError

log = logging.getLogger(__name__)

# The broker's answers that mean "this principal may not", not "try again later".
_REFUSALS = frozenset(
    {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    }
)


def is_refusal(err: KafkaError) -> bool:
    """Whether ``err`` is the broker refusing a permission (an ACL is missing).

    >>> is_refusal(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED))
    True
    >>> is_refusal(KafkaError(KafkaError._TRANSPORT))  # a lost connection: passing
    False
    """
    return err.code() in _REFUSALS


@dataclass(frozen=True, slots=True)
class Refusal:
    """One resource that refuses a permission the worker needs, since when (monotonic s)."""

    kind: str  # topic | group
    name: str
    permission: str  # the ACL operation to grant: Read | Write
    error: str  # the broker's error name, e.g. TOPIC_AUTHORIZATION_FAILED
    since: float

    def describe(self, now: float | None = None) -> str:
        what = f"{self.permission} on {self.kind} {self.name!r} ({self.error})"
        if now is None:
            return f"Kafka refuses this worker's principal {what}"
        return f"Kafka has refused this worker's principal {what} for {now - self.since:.0f} s"


class AccessRefusals:
    """The resources currently refusing this worker, safe to note from any thread.

    >>> now = [0.0]  # a fake monotonic clock, in seconds
    >>> refusals = AccessRefusals(clock=lambda: now[0])
    >>> first = refusals.refused("topic", "preds", "Write", "TOPIC_AUTHORIZATION_FAILED")
    >>> again = refusals.refused("topic", "preds", "Write", "TOPIC_AUTHORIZATION_FAILED")
    >>> first.since, again, refusals.refuses("Write"), refusals.refuses("Read")
    (0.0, None, True, False)
    >>> now[0] = 90.0
    >>> [line] = refusals.problems()
    >>> line.removeprefix("Kafka has refused this worker's principal ")
    "Write on topic 'preds' (TOPIC_AUTHORIZATION_FAILED) for 90 s: grant it"
    >>> refusals.allowed("topic", "preds", "Write") == first, refusals.active
    (True, False)
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        # By permission too: a topic may refuse Write and Read apart (each granted apart).
        self._refused: dict[tuple[str, str, str], Refusal] = {}

    @property
    def active(self) -> bool:
        """Whether anything is refused now (a lock-free check for the hot path)."""
        return bool(self._refused)

    def refuses(self, permission: str) -> bool:
        """Whether some resource refuses ``permission`` (Read, Write) now."""
        with self._lock:
            return any(p == permission for _kind, _name, p in self._refused)

    def __len__(self) -> int:
        return len(self._refused)

    def refused(self, kind: str, name: str, permission: str, error: str) -> Refusal | None:
        """Note a refusal; the first of a resource is logged and returned, repeats are not."""
        with self._lock:
            if (kind, name, permission) in self._refused:
                return None
            refusal = Refusal(kind, name, permission, error, self._clock())
            self._refused[(kind, name, permission)] = refusal
        log.error(
            "%s: grant it (docs/production.md, Kafka ACLs); retrying until then",
            refusal.describe(),
        )
        return refusal

    def allowed(self, kind: str, name: str, permission: str = "Read") -> Refusal | None:
        """``permission`` on the resource worked: forget its refusal (logged and returned, when
        there was one)."""
        if not self._refused:
            return None
        with self._lock:
            refusal = self._refused.pop((kind, name, permission), None)
        if refusal is not None:
            log.info("Kafka now grants %s on %s %r", refusal.permission, refusal.kind, refusal.name)
        return refusal

    def problems(self) -> list[str]:
        """One line per refused resource and permission, for ``/healthz``'s warnings."""
        now = self._clock()
        with self._lock:
            refused = sorted(self._refused.values(), key=lambda r: (r.kind, r.name, r.permission))
        return [f"{r.describe(now)}: grant it" for r in refused]
