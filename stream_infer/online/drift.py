"""Drift monitors: river's ADWIN on one signal of one (model, version), with damping.

Signals (``SIGNALS``, checked by :func:`parse_signal`; both defined in :mod:`stream_infer.online`):

* ``"error"``: one value per labelled event, the 0/1 misclassification of the classifier
  (:func:`error_of` computes it);
* ``"prediction"``: the served prediction value;
* ``"feature:<name>"``: the value of input feature ``<name>``.

A :class:`DriftMonitor` feeds every ``sample_every``-th value it is given to a
``river.drift.ADWIN(delta=delta)`` (with river's other defaults: it checks for a change every 32
values, after a grace period of 10). When ADWIN reports drift, the monitor returns a
:class:`DriftEvent` and starts a fresh ADWIN, so one abrupt change gives one event rather than
a burst while the window shrinks. With ``grace=0`` the events are exactly the detections of a
standalone ADWIN fed the same values (river's ADWIN also starts afresh after a detection).
With ``grace=g``, a detection among the ``g`` values that follow an event (or a
:meth:`DriftMonitor.reset`) is suppressed: the detector still starts afresh, no event is
returned, ``n_suppressed`` counts it, and the grace period is not extended.

An error rate that jumps from 0 to 1 after 200 events is detected 24 values later:

>>> monitor = DriftMonitor("risk", "v1", "error", clock=lambda: 0.0)
>>> [event] = monitor.update_many([0.0] * 200 + [1.0] * 200)
>>> event.at, event.previous, event.rose
(223, 0.0, True)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NoReturn

import orjson
from river import drift

from stream_infer.online import FEATURE_PREFIX, SIGNALS, parse_signal

# The signal grammar is stream_infer.online's; this module passes it on with its own names.
__all__ = [
    "DETECTOR",
    "FEATURE_PREFIX",
    "SIGNALS",
    "DriftEvent",
    "DriftMonitor",
    "error_of",
    "parse_signal",
]

DETECTOR = "adwin"

# river.drift.ADWIN has no annotations; called through this name, mypy strict accepts it.
_ADWIN: Callable[..., Any] = drift.ADWIN


def error_of(label: float, prediction: float) -> float:
    """The ``"error"`` signal of one labelled event of a classifier: 1.0 when
    ``prediction > 0.5`` disagrees with the 0/1 ``label`` (the same threshold as
    :class:`~stream_infer.online.prequential.Prequential`), else 0.0.

    >>> error_of(1.0, 0.7), error_of(1.0, 0.5)
    (0.0, 1.0)
    """
    return float((prediction > 0.5) != (label >= 0.5))


@dataclass(frozen=True)
class DriftEvent:
    """ADWIN detected a change in ``signal`` of ``model``/``version``.

    ``at`` is the 0-based index, among the values given to ADWIN since the monitor was made,
    of the value on which the change was detected; ``ts`` is the monitor's clock then;
    ``estimation`` and ``width`` are ADWIN's mean and length of its window after the cut (the
    recent, changed part); ``previous`` is the mean of the part it cut (the level before the
    change; None when not known). :attr:`rose` says which way the signal moved.
    """

    model: str
    version: str
    detector: str
    signal: str
    at: int
    ts: float
    estimation: float
    width: int
    previous: float | None = None

    @property
    def rose(self) -> bool | None:
        """Whether the signal went up (for ``error``: got worse); None when not known."""
        if self.previous is None:
            return None
        return self.estimation > self.previous

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))


class DriftMonitor:
    """ADWIN on one signal of one (model, version), one event per detected change.

    Parameters
    ----------
    model, version, signal
        What is monitored (``signal`` as in ``SIGNALS``).
    delta
        ADWIN's significance value, in (0, 1). Smaller: fewer false alarms, later detections.
    clock
        Wall-clock seconds for :attr:`DriftEvent.ts`.
    grace
        Values after an event (or :meth:`reset`) during which detections are suppressed.
    sample_every
        Feed ADWIN only the values at positions 0, k, 2k, ... of those given (k =
        ``sample_every``), for high-rate signals such as features.

    Not thread-safe: a monitor is owned by one thread.
    """

    def __init__(
        self,
        model: str,
        version: str,
        signal: str,
        *,
        delta: float = 0.002,
        clock: Callable[[], float] = time.time,
        grace: int = 0,
        sample_every: int = 1,
    ) -> None:
        for name, value in (("model", model), ("version", version)):
            if not isinstance(value, str) or not value:
                msg = f"DriftMonitor: {name} must be a non-empty string, got {value!r}"
                raise ValueError(msg)
        parse_signal(signal)
        if isinstance(delta, bool) or not isinstance(delta, int | float) or not 0 < delta < 1:
            msg = f"DriftMonitor: delta must be a number in (0, 1), got {delta!r}"
            raise ValueError(msg)
        if isinstance(grace, bool) or not isinstance(grace, int) or grace < 0:
            msg = f"DriftMonitor: grace must be an int >= 0, got {grace!r}"
            raise ValueError(msg)
        if isinstance(sample_every, bool) or not isinstance(sample_every, int) or sample_every < 1:
            msg = f"DriftMonitor: sample_every must be an int >= 1, got {sample_every!r}"
            raise ValueError(msg)
        self.model = model
        self.version = version
        self.signal = signal
        self.delta = float(delta)
        self.clock = clock
        self.grace = grace
        self.sample_every = sample_every
        self._adwin = _ADWIN(delta=self.delta)
        self._n_seen = 0
        self._n_fed = 0
        self._n_detections = 0
        self._n_suppressed = 0
        self._grace_until = -1  # the last fed index, inclusive, whose detection is suppressed

    @property
    def n_seen(self) -> int:
        """Values given to the monitor (sampled out or not)."""
        return self._n_seen

    @property
    def n_fed(self) -> int:
        """Values given to ADWIN (after sampling); the next event's ``at`` is at least this."""
        return self._n_fed

    @property
    def n_detections(self) -> int:
        """Events returned (suppressed detections not included)."""
        return self._n_detections

    @property
    def n_suppressed(self) -> int:
        """Detections suppressed by the grace period."""
        return self._n_suppressed

    @property
    def width(self) -> int:
        """ADWIN's current window length."""
        return int(self._adwin.width)

    @property
    def estimation(self) -> float:
        """ADWIN's current window mean."""
        return float(self._adwin.estimation)

    def reset(self) -> None:
        """Start a fresh ADWIN (say, after what serves changed); the grace period applies."""
        self._adwin = _ADWIN(delta=self.delta)
        self._grace_until = self._n_fed - 1 + self.grace

    def update_one(self, value: float) -> DriftEvent | None:
        """Give one value; returns the event when it completes a detected change."""
        v = float(value)
        if not math.isfinite(v):
            self._not_finite(value)
        return self._feed(v)

    def update_many(self, values: Sequence[float]) -> list[DriftEvent]:
        """Give values in order; returns the events they complete, in order.

        All values are checked before any is fed: a non-finite one raises ValueError and
        changes nothing.
        """
        floats = [float(v) for v in values]
        for v in floats:
            if not math.isfinite(v):
                self._not_finite(v)
        events = []
        feed = self._feed
        for v in floats:
            event = feed(v)
            if event is not None:
                events.append(event)
        return events

    def _not_finite(self, value: object) -> NoReturn:
        msg = (
            f"DriftMonitor {self.model}/{self.version} {self.signal}: values must be finite, "
            f"got {value!r}"
        )
        raise ValueError(msg)

    def _feed(self, v: float) -> DriftEvent | None:
        seen = self._n_seen
        self._n_seen = seen + 1
        if seen % self.sample_every:
            return None
        at = self._n_fed
        self._n_fed = at + 1
        adwin: Any = self._adwin
        # The whole window before this value: what the cut part's mean is derived from.
        width, total = int(adwin.width), float(adwin.estimation) * int(adwin.width)
        adwin.update(v)
        if not adwin.drift_detected:
            return None
        self._adwin = _ADWIN(delta=self.delta)
        if at <= self._grace_until:
            self._n_suppressed += 1
            return None
        self._n_detections += 1
        self._grace_until = at + self.grace
        return DriftEvent(
            model=self.model,
            version=self.version,
            detector=DETECTOR,
            signal=self.signal,
            at=at,
            ts=self.clock(),
            estimation=float(adwin.estimation),
            width=int(adwin.width),
            previous=_cut_mean(width + 1, total + v, int(adwin.width), float(adwin.estimation)),
        )


def _cut_mean(width: int, total: float, kept: int, kept_mean: float) -> float | None:
    """The mean of the values ADWIN cut: ``width`` values summing to ``total``, of which the
    last ``kept`` (mean ``kept_mean``) stay."""
    cut = width - kept
    if cut <= 0:
        return None
    return (total - kept * kept_mean) / cut
