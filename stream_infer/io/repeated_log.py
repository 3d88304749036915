"""Repeated log lines said once, then counted: a broker outage is a few lines per interval,
not forty a second.

librdkafka logs every failed connection attempt of every client (``FAIL ... Connect to ...
failed: Connection refused``): about 20 a second per consumer while the cluster is down (one
worker logged 1,379 ERROR lines in 35 s). :class:`RateLimitedLog` logs the first line of a kind
(its key: the client and what went wrong), then at most one line per ``interval_s`` for that
kind, which says how many were suppressed since the last; :meth:`RateLimitedLog.flush_due`
says it for kinds that stopped. :class:`LibrdkafkaLog` is what every client's ``logger``
property gets (:mod:`stream_infer.io.clients`): librdkafka's lines at WARNING and above go
through one, keyed by client, facility and the message without its broker name and timings.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

# How often a repeated kind of line is logged again, with its count.
REPEAT_INTERVAL_S = 30.0


@dataclass(slots=True)
class _Kind:
    logged_at: float  # when a line of this kind was last logged (the clock's time)
    level: int
    msg: str  # the last line suppressed, formatted (for flush_due)
    suppressed: int = 0


class RateLimitedLog:
    """Log the first line of each key at once, then at most one per ``interval_s`` with the
    number suppressed since the last one logged. Thread-safe. ``clock``: a monotonic clock in
    seconds (injected in tests). At most ``max_keys`` kinds are remembered (the oldest logged
    is forgotten first).

    >>> t = [0.0]
    >>> limited = RateLimitedLog(logging.getLogger("doc"), 10.0, clock=lambda: t[0])
    >>> [limited.log(logging.ERROR, "k", "down") for t[0] in (0.0, 1.0, 2.0, 10.5)]
    [True, False, False, True]
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = REPEAT_INTERVAL_S,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 1024,
    ) -> None:
        if interval_s <= 0 or max_keys < 1:
            msg = f"interval_s must be > 0 and max_keys >= 1, got {interval_s}, {max_keys}"
            raise ValueError(msg)
        self.logger = logger
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._clock = clock
        self._kinds: dict[Hashable, _Kind] = {}
        self._lock = threading.Lock()

    def log(self, level: int, key: Hashable, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless a line of ``key`` was logged less than ``interval_s`` ago
        (then it is counted). True when it was logged."""
        now = self._clock()
        with self._lock:
            kind = self._kinds.get(key)
            if kind is not None and now - kind.logged_at < self.interval_s:
                kind.suppressed += 1
                kind.level, kind.msg = level, _format(msg, args)
                return False
            suppressed, since = (kind.suppressed, kind.logged_at) if kind else (0, now)
            self._kinds.pop(key, None)  # re-inserted last: the dict stays in logging order
            self._kinds[key] = _Kind(now, level, "")
            while len(self._kinds) > self.max_keys:
                del self._kinds[next(iter(self._kinds))]
        if suppressed:
            self.logger.log(
                level,
                "%s (%d more like it in the last %.0f s)",
                _format(msg, args),
                suppressed,
                now - since,
            )
        else:
            self.logger.log(level, msg, *args)
        return True

    def flush_due(self) -> int:
        """For each kind with lines suppressed whose interval has passed, log the last of them
        with the count (a kind that stopped repeating is not left untold); forget the kinds
        whose interval passed. Returns the lines logged."""
        now = self._clock()
        due: list[tuple[_Kind, float]] = []
        with self._lock:
            for key, kind in list(self._kinds.items()):
                if now - kind.logged_at < self.interval_s:
                    continue
                del self._kinds[key]
                if kind.suppressed:
                    due.append((kind, now - kind.logged_at))
        for kind, since_s in due:
            self.logger.log(
                kind.level,
                "%s (%d like it in the last %.0f s)",
                kind.msg,
                kind.suppressed,
                since_s,
            )
        return len(due)


def _format(msg: str, args: tuple[object, ...]) -> str:
    try:
        return msg % args if args else msg
    except (TypeError, ValueError):
        return f"{msg} {args!r}"


# librdkafka's message text: "[thrd:NAME]: BROKER: what happened (after 0ms in state CONNECT)".
_THREAD = re.compile(r"^\[thrd:[^\]]*\]: ")
_BROKER = re.compile(r"^(?:(?:GroupCoordinator|TxnCoordinator)(?:: )?)?(?:\S+:\d+(?:/\w+)?)?: ")
_TIMINGS = re.compile(r"\d+(?:\.\d+)? ?ms\b")
# librdkafka's own count of the same error: the lines it counts are of the kind they repeat.
_ITS_COUNT = re.compile(r", \d+ identical error\(s\) suppressed")


def librdkafka_kind(client: str, facility: str, text: str) -> tuple[str, str, str]:
    """The key of a librdkafka line: which client, its facility, and its text without the
    thread and broker names (the bootstrap connection, a node's and the coordinator's say the
    same), without timings and without librdkafka's own count of identical errors.

    >>> librdkafka_kind("c#consumer-1", "FAIL", "[thrd:k:9092/bootstrap]: k:9092/bootstrap: "
    ...                 "Connect to ipv4#10.0.0.1:9092 failed (after 3ms in state CONNECT, "
    ...                 "2 identical error(s) suppressed)")
    ('c#consumer-1', 'FAIL', 'Connect to ipv4#10.0.0.1:9092 failed (after #ms in state CONNECT)')
    """
    body = _ITS_COUNT.sub("", _BROKER.sub("", _THREAD.sub("", text), count=1))
    return client, facility, _TIMINGS.sub("#ms", body)


class LibrdkafkaLog:
    """The ``logger`` a confluent-kafka client is given: librdkafka's lines (confluent-kafka
    calls ``log(level, "%s [%s] %s", facility, client, text)`` from the thread that polls the
    client) go to ``logger``, those at WARNING and above through a :class:`RateLimitedLog`."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = REPEAT_INTERVAL_S,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.limited = RateLimitedLog(logger, interval_s, clock=clock)

    def log(self, level: int, msg: str, *args: object) -> None:
        if level < logging.WARNING or len(args) != 3:
            self.logger.log(level, msg, *args)
            return
        facility, client, text = (str(a) for a in args)
        self.limited.log(level, librdkafka_kind(client, facility, text), msg, *args)

    def flush_due(self) -> int:
        return self.limited.flush_due()
