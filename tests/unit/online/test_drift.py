"""DriftMonitor: golden indices against a standalone river ADWIN, damping, no false alarms."""

from __future__ import annotations

import random

import orjson
import pytest
from river import drift

from stream_infer.online import parse_signal
from stream_infer.online.drift import DriftEvent, DriftMonitor, error_of

CHANGE = 5000


def bernoulli(seed: int, segments: list[tuple[float, int]]) -> list[float]:
    """0/1 error values: ``n`` draws with P(1) = ``p`` per segment, from random.Random(seed)."""
    rng = random.Random(seed)
    return [float(rng.random() < p) for p, n in segments for _ in range(n)]


def adwin_detections(values: list[float], delta: float = 0.002) -> list[int]:
    """The indices at which a standalone river ADWIN reports drift."""
    adwin = drift.ADWIN(delta=delta)
    found = []
    for i, v in enumerate(values):
        adwin.update(v)
        if adwin.drift_detected:
            found.append(i)
    return found


def monitor(**kwargs: object) -> DriftMonitor:
    return DriftMonitor("risk", "v1", "error", clock=lambda: 123.0, **kwargs)  # type: ignore[arg-type]


# Error rate 0.1, then 0.5 from index 5000 on: one abrupt change.
ABRUPT = bernoulli(7, [(0.1, CHANGE), (0.5, 5000)])


def test_golden_abrupt_change_is_detected_where_adwin_detects_it() -> None:
    expected = adwin_detections(ABRUPT)
    assert expected, "ADWIN must detect the change"
    events = monitor().update_many(ABRUPT)
    assert [e.at for e in events][:1] == expected[:1]
    first = events[0]
    assert CHANGE <= first.at < CHANGE + 1000  # after the change, with a bounded delay
    # Damping: one abrupt change, one event over the 5000 values that follow it.
    assert [e.at for e in events if CHANGE <= e.at < CHANGE + 5000] == [first.at]
    # river's ADWIN also starts afresh after a detection, so with grace=0 all indices agree.
    assert [e.at for e in events] == expected
    assert first == DriftEvent(
        model="risk",
        version="v1",
        detector="adwin",
        signal="error",
        at=expected[0],
        ts=123.0,
        estimation=first.estimation,
        width=first.width,
        previous=first.previous,
    )
    assert 0.0 < first.estimation < 1.0 and 0 < first.width <= first.at + 1
    # The part ADWIN cut is the level before the change (P(1) = 0.1): the error rose.
    assert first.previous is not None and abs(first.previous - 0.1) < 0.02
    assert first.rose is True


def test_a_fall_is_told_from_a_rise() -> None:
    falling = bernoulli(7, [(0.5, CHANGE), (0.1, 5000)])
    first = monitor().update_many(falling)[0]
    assert first.previous is not None and abs(first.previous - 0.5) < 0.03
    assert first.rose is False


def test_golden_index_is_the_same_one_value_at_a_time() -> None:
    m = monitor()
    events = [e for e in map(m.update_one, ABRUPT) if e is not None]
    assert [e.at for e in events] == adwin_detections(ABRUPT)
    assert (m.n_seen, m.n_fed, m.n_detections, m.n_suppressed) == (10_000, 10_000, 1, 0)


def test_sampling_feeds_every_kth_value_and_indexes_among_them() -> None:
    expected = adwin_detections(ABRUPT[::2])
    m = monitor(sample_every=2)
    events = m.update_many(ABRUPT)
    assert [e.at for e in events] == expected
    assert (m.n_seen, m.n_fed) == (10_000, 5_000)
    assert CHANGE // 2 <= events[0].at < CHANGE // 2 + 500


def test_grace_suppresses_a_second_detection_soon_after_an_event() -> None:
    # 0.1 -> 0.5 at 5000 -> 0.9 at 5300: two changes close together.
    values = bernoulli(7, [(0.1, CHANGE), (0.5, 300), (0.9, 4700)])
    undamped = adwin_detections(values)
    assert len(undamped) == 2 and undamped[1] - undamped[0] < 500
    assert [e.at for e in monitor().update_many(values)] == undamped
    m = monitor(grace=500)
    assert [e.at for e in m.update_many(values)] == undamped[:1]
    assert (m.n_detections, m.n_suppressed) == (1, 1)


def test_no_false_alarm_on_a_long_stationary_stream() -> None:
    """100,000 seeded Bernoulli(0.2) values at the default delta=0.002: no drift event."""
    values = bernoulli(2024, [(0.2, 100_000)])
    assert adwin_detections(values) == []
    m = monitor()
    assert m.update_many(values) == []
    assert (m.n_seen, m.n_detections) == (100_000, 0)


def test_reset_starts_a_fresh_window_and_the_grace_period() -> None:
    fresh = adwin_detections(ABRUPT[2000:])  # what a new ADWIN finds after the reset
    assert fresh
    plain = monitor()
    plain.update_many(ABRUPT[:2000])
    assert plain.width > 0
    plain.reset()
    assert plain.width == 0
    assert [e.at for e in plain.update_many(ABRUPT[2000:])] == [2000 + i for i in fresh]
    damped = monitor(grace=10_000)
    damped.update_many(ABRUPT[:2000])
    damped.reset()
    assert damped.update_many(ABRUPT[2000:]) == []  # the change falls in the grace period
    assert (damped.n_detections, damped.n_suppressed) == (0, len(fresh))


def test_event_json() -> None:
    event = DriftEvent("risk", "v1", "adwin", "feature:age", 42, 1.5, 0.25, 320)
    assert orjson.loads(event.to_json()) == {
        "model": "risk",
        "version": "v1",
        "detector": "adwin",
        "signal": "feature:age",
        "at": 42,
        "ts": 1.5,
        "estimation": 0.25,
        "width": 320,
        "previous": None,
    }


def test_signals_and_errors() -> None:
    assert parse_signal("error") == ("error", None)
    assert parse_signal("prediction") == ("prediction", None)
    assert parse_signal("feature:age") == ("feature", "age")
    for bad in ("feature:", "features:age", "latency", ""):
        with pytest.raises(ValueError, match="signal"):
            parse_signal(bad)
    assert error_of(1.0, 0.7) == 0.0
    assert error_of(1.0, 0.5) == 1.0  # 0.5 predicts 0, as in Prequential
    assert error_of(0.0, 0.5) == 0.0


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="signal"):
        DriftMonitor("risk", "v1", "latency")
    with pytest.raises(ValueError, match="delta"):
        DriftMonitor("risk", "v1", "error", delta=0)
    with pytest.raises(ValueError, match="grace"):
        DriftMonitor("risk", "v1", "error", grace=-1)
    with pytest.raises(ValueError, match="sample_every"):
        DriftMonitor("risk", "v1", "error", sample_every=0)
    with pytest.raises(ValueError, match="version"):
        DriftMonitor("risk", "", "error")
    m = monitor()
    with pytest.raises(ValueError, match="finite"):
        m.update_one(float("nan"))
    with pytest.raises(ValueError, match="finite"):
        m.update_many([0.0, 1.0, float("inf")])
    assert m.n_seen == 0  # a rejected batch feeds nothing
