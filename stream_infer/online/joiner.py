"""Join labels to the events they label, with every version that scored the event.

Predictions are served long before their labels arrive (seconds to days), and labels can also
arrive *before* the event they label (a separate topic, another partition, a slow consumer).
:class:`LabelJoiner` keeps both sides, bounded in count and in age:

* an event (its features and the versions that served it) waits for its label;
* a label whose event has not been seen yet waits as an *early* label;
* an id that was joined is remembered, so a second label for it is a *duplicate*.

Each of the three stores holds at most ``max_entries`` ids; when one is full its oldest entry is
evicted. :meth:`LabelJoiner.expire` drops entries older than ``ttl_s``. Every operation is O(1)
amortised per item (insertion-ordered ``OrderedDict`` stores, oldest first).

Each event and early label may carry the input partition it came from: :meth:`expire`, given
the partitions the worker owns now, counts the events that expired while their partition
belongs to another worker (``expired_moved``: their labels went to the new owner).

Memory (CPython 3.11, tracemalloc in ``tests/unit/online/test_joiner.py``): a pending event
costs about 0.7 KiB with 8 features, one version that scored it and a 16-character id, plus 32
bytes per further feature (a Python float and its tuple slot) and about 120 bytes per further
version (shadows, splits); an early label about 0.2 KiB; a joined id's memory about 0.15 KiB.
With ``max_entries`` 200,000 and 30 features: about 270 MiB of pending events at most, plus
about 40 MiB of early labels and 25 MiB of joined ids.

The joiner is not thread-safe: it is owned by one thread (the learning side of the runtime).

A label that arrives before its event waits for it, and joins when it comes:

>>> import numpy as np
>>> joiner = LabelJoiner(ttl_s=60.0, max_entries=1000, clock=lambda: 0.0)
>>> joiner.add_label_one("e1", 1.0) is None, joiner.early
(True, 1)
>>> served = [Served("e1", "risk", "v1", 0.8, 0.0)]
>>> [joined] = joiner.add_event_many(["e1"], np.array([[0.5, 2.0]]), served)
>>> joined.label, joined.features, [s.version for s in joined.served]
(1.0, (0.5, 2.0), ['v1'])
>>> joiner.add_label_one("e1", 0.0) is None, joiner.duplicate_labels
(True, 1)
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt

from stream_infer.core.events import ModelVersion


@dataclass(frozen=True, slots=True)
class Served:
    """One version's prediction for one event; ``ts`` is when it was served (joiner's clock)."""

    id: str
    model: str
    version: str
    prediction: float
    ts: float
    generation: int = -1  # the routing table's generation that served it (-1: unknown)


@dataclass(frozen=True, slots=True)
class Joined:
    """An event whose label arrived, with every version that scored it (serving and shadow)."""

    id: str
    label: float
    features: tuple[float, ...]
    served: tuple[Served, ...]


@dataclass(slots=True)
class _Pending:
    features: tuple[float, ...]
    served: list[Served]
    at: float
    partition: int = -1  # the input partition it came from; -1: not known


class LabelJoiner:
    """Bounded, TTL'd join of events and their labels.

    Parameters
    ----------
    ttl_s
        How long an unlabelled event, an early label or the memory of a joined id is kept, in
        seconds of ``clock``.
    max_entries
        The most events, and separately the most early labels and joined ids, held at once. The
        oldest is evicted to make room.
    clock
        A monotonic clock in seconds.

    Counters (ints, read through properties): ``joined`` joins completed; ``duplicate_labels``
    labels ignored because their id was already joined (or already had an early label);
    ``duplicate_events`` events ignored because their id was already joined; ``expired`` events
    dropped by :meth:`expire` without a label; ``expired_labels`` early labels dropped by
    :meth:`expire` without their event; ``evicted`` events and early labels pushed out by the
    capacity bound; ``expired_moved`` the expired events whose partition was owned by another
    worker then (a subset of ``expired``). Gauges: ``pending`` events waiting for a label now,
    ``early`` early labels waiting for their event now.

    All the versions that scored an event should be given in one :meth:`add_event_many` call (a
    pipeline batch's serving and shadow predictions together): an event that was already joined
    is not reopened for versions that arrive later.
    """

    def __init__(
        self, ttl_s: float, max_entries: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not (isinstance(ttl_s, int | float) and math.isfinite(ttl_s) and ttl_s > 0):
            msg = f"LabelJoiner: ttl_s must be a finite number > 0, got {ttl_s!r}"
            raise ValueError(msg)
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            msg = f"LabelJoiner: max_entries must be an int >= 1, got {max_entries!r}"
            raise ValueError(msg)
        self.ttl_s = float(ttl_s)
        self.max_entries = max_entries
        self.clock = clock
        self._events: OrderedDict[str, _Pending] = OrderedDict()
        self._early: OrderedDict[str, tuple[float, float]] = OrderedDict()  # id -> (label, at)
        self._done: OrderedDict[str, float] = OrderedDict()  # joined id -> when joined
        self._joined = 0
        self._duplicate_labels = 0
        self._duplicate_events = 0
        self._expired = 0
        self._expired_labels = 0
        self._expired_moved = 0
        self._evicted = 0

    # -- counters ---------------------------------------------------------------------------

    @property
    def joined(self) -> int:
        return self._joined

    @property
    def early(self) -> int:
        """Early labels waiting for their event now."""
        return len(self._early)

    @property
    def duplicate_labels(self) -> int:
        return self._duplicate_labels

    @property
    def duplicate_events(self) -> int:
        return self._duplicate_events

    @property
    def expired(self) -> int:
        """Events dropped by :meth:`expire` without a label (total)."""
        return self._expired

    @property
    def expired_labels(self) -> int:
        """Early labels dropped by :meth:`expire` without their event (total)."""
        return self._expired_labels

    @property
    def expired_moved(self) -> int:
        """Expired events whose partition was not owned here when they expired (total)."""
        return self._expired_moved

    @property
    def evicted(self) -> int:
        """Events and early labels pushed out by the capacity bound (total)."""
        return self._evicted

    @property
    def pending(self) -> int:
        """Events waiting for their label now."""
        return len(self._events)

    # -- the join ---------------------------------------------------------------------------

    def add_event_many(
        self,
        ids: Sequence[str],
        features: npt.NDArray[Any],
        served: Sequence[Served],
        partitions: Sequence[int] | None = None,
    ) -> list[Joined]:
        """Record events (``features[i]`` is the row of ``ids[i]``, ``partitions[i]`` its input
        partition, when given) and the versions that served them. Returns the joins completed
        now by labels that had arrived early.

        An id already waiting gets the new versions added to it; an id already joined is ignored
        (``duplicate_events``). Every ``Served`` must name one of ``ids``.
        """
        n = len(ids)
        if features.ndim != 2 or features.shape[0] != n:
            msg = (
                f"LabelJoiner.add_event_many: features must be a 2-d array with one row per id "
                f"({n} ids), got shape {tuple(features.shape)}"
            )
            raise ValueError(msg)
        if partitions is not None and len(partitions) != n:
            msg = (
                f"LabelJoiner.add_event_many: {len(partitions)} partitions for {n} ids "
                "(one per id expected)"
            )
            raise ValueError(msg)
        parts = list(partitions) if partitions is not None else [-1] * n
        by_id: dict[str, list[Served]] = {event_id: [] for event_id in ids}
        for s in served:
            versions = by_id.get(s.id)
            if versions is None:
                msg = f"LabelJoiner.add_event_many: served prediction for unknown id {s.id!r}"
                raise ValueError(msg)
            versions.append(s)
        rows = features.tolist()
        now = self.clock()
        joins: list[Joined] = []
        events, early, done = self._events, self._early, self._done
        for event_id, row, partition in zip(ids, rows, parts, strict=True):
            versions = by_id[event_id]
            if event_id in done:
                self._duplicate_events += 1
                continue
            waiting = events.get(event_id)
            if waiting is not None:
                seen = {ModelVersion(s.model, s.version) for s in waiting.served}
                waiting.served.extend(
                    s for s in versions if ModelVersion(s.model, s.version) not in seen
                )
                continue
            label = early.pop(event_id, None)
            if label is not None:
                joins.append(Joined(event_id, label[0], tuple(row), tuple(versions)))
                self._mark_done(event_id, now)
                continue
            events[event_id] = _Pending(tuple(row), list(versions), now, partition)
            by_id[event_id] = []  # a repeated id in this call merges into the stored list
            if len(events) > self.max_entries:
                events.popitem(last=False)
                self._evicted += 1
        return joins

    def add_label_one(self, event_id: str, label: float) -> Joined | None:
        """Join a label with its stored event, or keep it as early until its event comes.

        Returns the join, or None when the label is kept as early or is a duplicate.
        """
        value = float(label)
        if not math.isfinite(value):
            msg = f"LabelJoiner.add_label_one: label of {event_id!r} must be finite, got {label!r}"
            raise ValueError(msg)
        now = self.clock()
        if event_id in self._done or event_id in self._early:
            self._duplicate_labels += 1
            return None
        waiting = self._events.pop(event_id, None)
        if waiting is None:
            self._early[event_id] = (value, now)
            if len(self._early) > self.max_entries:
                self._early.popitem(last=False)
                self._evicted += 1
            return None
        self._mark_done(event_id, now)
        return Joined(event_id, value, waiting.features, tuple(waiting.served))

    def expire(self, owned: Container[int] | None = None) -> int:
        """Drop events, early labels and joined-id memories older than ``ttl_s``.

        ``owned``: the input partitions this worker owns now; an expired event of a known
        partition not among them is also counted in ``expired_moved``. Returns how many events
        expired unlabelled (also added to ``expired``).
        """
        cutoff = self.clock() - self.ttl_s
        n = 0
        events = self._events
        while events:
            oldest = next(iter(events.values()))
            if oldest.at > cutoff:
                break
            events.popitem(last=False)
            n += 1
            if owned is not None and oldest.partition >= 0 and oldest.partition not in owned:
                self._expired_moved += 1
        self._expired += n
        early = self._early
        while early and next(iter(early.values()))[1] <= cutoff:
            early.popitem(last=False)
            self._expired_labels += 1
        done = self._done
        while done and next(iter(done.values())) <= cutoff:
            done.popitem(last=False)
        return n

    def _mark_done(self, event_id: str, now: float) -> None:
        self._joined += 1
        self._done[event_id] = now
        if len(self._done) > self.max_entries:
            self._done.popitem(last=False)
