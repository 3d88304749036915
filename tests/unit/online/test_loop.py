"""LearningLoop, the pure online-learning step: labels join what was served, are scored
test-then-train, are learned, feed the monitors, and drift becomes policy commands. No thread,
no broker, fake clocks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from stream_infer.core.events import FeatureBatch, ModelVersion
from stream_infer.core.routing import Route
from stream_infer.online.loop import Drift, Learner, LearningLoop, Scored
from stream_infer.online.policy import commands_for
from stream_infer.settings import OnlineSettings

FEATURES = ("a", "b")
Array = np.ndarray[Any, Any]


def settings(**online: Any) -> OnlineSettings:
    return OnlineSettings.model_validate(online)


class FakeLearner:
    """A learner that predicts a fixed probability and records what it was asked, in order."""

    def __init__(self, version: str = "online", p: float = 0.9, model: str = "risk") -> None:
        self.model, self.version, self.p = model, version, p
        self.calls: list[tuple[str, dict[str, float], bool | None]] = []

    def predict_proba_one(self, x: Mapping[str, float]) -> float:
        self.calls.append(("predict", dict(x), None))
        return self.p

    @property
    def n_learned(self) -> int:
        return sum(1 for call in self.calls if call[0] == "learn")

    def learn_one(self, x: Mapping[str, float], y: bool) -> None:
        self.calls.append(("learn", dict(x), y))


def make_loop(
    online: OnlineSettings,
    learners: Sequence[Learner] = (),
    routes: Mapping[str, Route] | None = None,
    **kwargs: Any,
) -> LearningLoop:
    return LearningLoop(
        online,
        FEATURES,
        learners=lambda: list(learners),
        routes=lambda: routes or {"risk": Route.single("v1")},
        wall_clock=lambda: 1000.0,
        **kwargs,
    )


def batch_of(ids: list[str], x: np.ndarray[Any, Any] | None = None) -> FeatureBatch:
    n = len(ids)
    rows = np.ones((n, 2), dtype=np.float32) if x is None else x.astype(np.float32)
    return FeatureBatch(ids, [b"k"] * n, [None] * n, list(range(n)), rows)


def scored(ids: list[str], p: float = 0.2, version: str = "v1") -> list[Scored]:
    return [("risk", version, ids, np.full(len(ids), p))]


def ids_of(n: int, prefix: str = "e") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


# --- join -> score -> drift -> policy command ---------------------------------------------------


def test_an_error_jump_of_the_serving_version_becomes_a_swap_to_the_online_learner() -> None:
    online = settings(
        monitors=[{"signal": "error"}],
        policies=[
            {"signal": "error", "action": "alert"},
            {"signal": "error", "action": "shift_to_online", "online_version": "online"},
        ],
    )
    routes = {"risk": Route.single("v1")}
    loop = make_loop(online, routes=routes, generation=lambda: 7)
    ids = ids_of(400)
    # The labels come first (early), their events after: the joins happen in scored_many.
    assert loop.labels_many([(i, 0.0 if n < 200 else 1.0) for n, i in enumerate(ids)]) == []
    assert loop.joiner.early == 400
    drifts = loop.scored_many(batch_of(ids), scored(ids, p=0.2))
    [drift] = drifts
    assert isinstance(drift, Drift)
    assert (drift.event.model, drift.event.version, drift.event.signal) == ("risk", "v1", "error")
    assert (drift.event.at, drift.event.rose, drift.event.ts) == (223, True, 1000.0)
    # Exactly what the policies say, in policy order (alert says nothing), unsealed.
    expected = [
        c for p in loop.policies for c in commands_for(p, drift.event, routes, generation=7)
    ]
    assert drift.commands == expected
    assert [(c["command"], c["version"], c["if_generation"]) for c in drift.commands] == [
        ("swap", "online", 7)
    ]
    assert "signature" not in drift.commands[0] and "ts" not in drift.commands[0]
    assert loop.prequential[ModelVersion("risk", "v1")].n == 400
    progress = loop.take_progress()
    assert (progress.joined, progress.learned) == (400, {})
    assert loop.take_progress().joined == 0, "taken: zero again"


def test_without_labels_nothing_waits_for_a_join() -> None:
    loop = make_loop(settings(monitors=[{"signal": "error"}]), labelled=False)
    ids = ids_of(3)
    assert loop.scored_many(batch_of(ids), scored(ids)) == []
    assert loop.joiner.pending == 0
    assert loop.labels_many([(i, 1.0) for i in ids]) == []
    assert loop.take_progress().joined == 0


def test_the_joins_error_drift_comes_before_the_batchs_prediction_drift() -> None:
    loop = make_loop(settings(monitors=[{"signal": "error"}, {"signal": "prediction"}]))
    ids = ids_of(400)
    loop.labels_many([(i, 0.0) for i in ids])  # early: they join when the batch comes
    # The predictions jump from 0.2 to 0.9 halfway: so does the error (the labels stay 0).
    predictions = np.array([0.2] * 200 + [0.9] * 200)
    drifts = loop.scored_many(batch_of(ids), [("risk", "v1", ids, predictions)])
    # The prediction monitor saw its values first, but the joins' drift is reported first.
    assert [d.event.signal for d in drifts] == ["error", "prediction"]


def test_feature_monitors_watch_their_column_under_model_and_version_any() -> None:
    loop = make_loop(settings(monitors=[{"signal": "feature:b"}]))
    ids = ids_of(400)
    x = np.zeros((400, 2))
    x[200:, 1] = 1.0  # column b jumps; column a does not move
    [drift] = loop.scored_many(batch_of(ids, x), scored(ids))
    assert (drift.event.model, drift.event.version, drift.event.signal) == ("*", "*", "feature:b")
    assert drift.commands == []  # no policy
    assert list(loop.monitors) == [("*", "*", "feature:b")]


# --- learners: tested, then trained ---------------------------------------------------------


def test_a_learner_that_did_not_serve_is_tested_then_trained_on_each_label() -> None:
    learner = FakeLearner("online", p=0.9)
    loop = make_loop(settings(), [learner])
    ids = ids_of(2)
    loop.scored_many(batch_of(ids, np.array([[1.0, 2.0], [3.0, 4.0]])), scored(ids, p=0.2))
    loop.labels_many([("e0", 1.0), ("e1", 0.0)])
    assert learner.calls == [
        ("predict", {"a": 1.0, "b": 2.0}, None),
        ("learn", {"a": 1.0, "b": 2.0}, True),
        ("predict", {"a": 3.0, "b": 4.0}, None),
        ("learn", {"a": 3.0, "b": 4.0}, False),
    ]
    # Both versions are scored prequentially: v1 on what it served, the learner on its test.
    served, online = (
        loop.prequential[ModelVersion("risk", "v1")],
        loop.prequential[ModelVersion("risk", "online")],
    )
    assert (served.n, online.n) == (2, 2)
    assert online.report()["accuracy"] == 0.5  # 0.9 says 1: right on e0, wrong on e1
    progress = loop.take_progress()
    assert progress.joined == 2
    assert progress.learned == {ModelVersion("risk", "online"): 2}


def test_a_learner_that_served_the_event_is_scored_on_what_it_served_and_only_trained() -> None:
    learner = FakeLearner("online", p=0.9)
    loop = make_loop(settings(), [learner])
    ids = ids_of(1)
    loop.scored_many(batch_of(ids), scored(ids, p=0.1, version="online"))
    loop.labels_many([("e0", 1.0)])
    assert [c[0] for c in learner.calls] == ["learn"]
    assert (
        loop.prequential[ModelVersion("risk", "online")].report()["accuracy"] == 0.0
    )  # 0.1 was served


def test_what_was_learned_before_a_failure_is_still_taken() -> None:
    class Broken(FakeLearner):
        def learn_one(self, x: Mapping[str, float], y: bool) -> None:
            if len(self.calls) >= 3:  # the second event's learn fails
                raise RuntimeError("river broke")
            super().learn_one(x, y)

    loop = make_loop(settings(), [Broken()])
    ids = ids_of(2)
    loop.scored_many(batch_of(ids), scored(ids))
    with pytest.raises(RuntimeError, match="river broke"):
        loop.labels_many([(i, 1.0) for i in ids])
    progress = loop.take_progress()
    assert (progress.joined, progress.learned) == (2, {ModelVersion("risk", "online"): 1})


# --- monitor reset ------------------------------------------------------------------------------


def test_serving_changed_restarts_that_models_error_and_prediction_monitors_only() -> None:
    online = settings(
        monitors=[{"signal": "error"}, {"signal": "prediction"}, {"signal": "feature:a"}]
    )
    loop = make_loop(online)
    error = loop.monitors_for("risk", "v1", "error")[0]
    prediction = loop.monitors_for("risk", "v1", "prediction")[0]
    feature = loop.monitors_for("*", "*", "feature:a")[0]
    other = loop.monitors_for("fraud", "v1", "error")[0]
    for monitor in (error, prediction, feature, other):
        monitor.update_many([0.0] * 5)
    loop.serving_changed(["risk"])
    assert (error.width, prediction.width) == (0, 0), "a fresh window"
    assert (feature.width, other.width) == (5, 5)
    assert loop.monitors_for("risk", "v1", "error") == [error], "the same monitor, afresh"
    assert loop.monitors_for("risk", "v1", "accuracy") == [], "no setting, no monitor"


# --- expiry and the joiner's counts -----------------------------------------------------------


def test_expire_reports_what_the_joiner_did_since_the_last_expiry() -> None:
    now = [0.0]
    loop = make_loop(settings(label_ttl_s=10.0), clock=lambda: now[0])
    ids = ["e0", "e1", "e2"]
    loop.scored_many(batch_of(ids), scored(ids), [0, 1, 0])
    loop.labels_many([("e2", 1.0), ("e2", 0.0), ("orphan", 1.0)])  # a duplicate, an orphan
    counts = loop.expire({0})
    assert (counts.expired, counts.moved, counts.orphans, counts.duplicates) == (0, 0, 0, 1)
    assert (counts.early, counts.pending) == (1, 2)
    now[0] = 11.0
    counts = loop.expire({0})  # partition 1 moved to another worker
    assert (counts.expired, counts.moved, counts.orphans, counts.duplicates) == (2, 1, 1, 0)
    assert (counts.early, counts.pending) == (0, 0)
    counts = loop.expire({0})
    assert (counts.expired, counts.moved, counts.orphans, counts.duplicates) == (0, 0, 0, 0)


# --- a learner's warm-up (issue 18) -------------------------------------------------------------


class SlowLearner:
    """Wrong on every label until it has learned ``until`` of them (since it was made or
    reset), then right as long as feature ``a`` is the label: a fresh learner's first errors,
    then a learned concept."""

    def __init__(self, until: int = 150) -> None:
        self.model, self.version, self.until = "risk", "online", until
        self._n = 0

    @property
    def n_learned(self) -> int:
        return self._n

    def predict_proba_one(self, x: Mapping[str, float]) -> float:
        return x["a"] if self._n >= self.until else 1.0 - x["a"]

    def learn_one(self, x: Mapping[str, float], y: bool) -> None:
        self._n += 1

    def reset(self) -> None:
        self._n = 0


def stream(n: int, flip_at: int, seed: int = 7) -> tuple[Array, Array]:
    """Seeded labels, and rows whose feature ``a`` is the label until ``flip_at``, its
    opposite after (the concept flips)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(np.float64)
    a = np.where(np.arange(n) < flip_at, y, 1.0 - y)
    return np.column_stack([a, rng.normal(size=n)]), y


def online_error_events(
    warmup: int, learner: SlowLearner, x: Array, y: Array
) -> tuple[LearningLoop, list[Drift]]:
    online = settings(
        learners=[{"model": "risk", "version": "online", "warmup_labels": warmup}],
        monitors=[{"signal": "error"}],
        policies=[{"signal": "error", "action": "reset_learner", "online_version": "online"}],
    )
    loop = make_loop(online, [learner])
    drifts: list[Drift] = []
    for start in range(0, len(y), 100):
        ids = [f"e{i}" for i in range(start, min(start + 100, len(y)))]
        drifts += loop.scored_many(batch_of(ids, x[start : start + 100]), scored(ids, p=0.2))
        drifts += loop.labels_many([(i, float(y[int(i[1:])])) for i in ids])
    return loop, [d for d in drifts if d.event.version == "online"]


def test_a_fresh_learners_early_errors_raise_no_drift_and_later_drift_is_still_caught() -> None:
    x, y = stream(2000, flip_at=1000)
    # Without a warm-up the learner's first errors, then their fall as it learns, alarm.
    _loop, early = online_error_events(0, SlowLearner(150), x, y)
    assert (early[0].event.at, early[0].event.rose) == (191, False)

    loop, drifts = online_error_events(200, SlowLearner(150), x, y)
    # The warm-up: its monitor saw nothing of the first 200 labels, and no alarm before the flip.
    [drift] = drifts
    assert drift.event.signal == "error" and drift.event.rose is True
    # The flip is the monitor's value 1000 - 200 = 800, caught 31 labels later (golden).
    assert drift.event.at == 831
    assert drift.commands and drift.commands[0]["command"] == "reset_learner", "a rise acts"
    monitor = loop.monitors_for("risk", "online", "error")[0]
    assert monitor.n_seen == 2000 - 200
    # Its prequential metrics count every label, the warm-up's too.
    assert loop.prequential[ModelVersion("risk", "online")].n == 2000


def test_a_reset_learner_warms_up_again() -> None:
    x, y = stream(1400, flip_at=10_000)  # no flip
    learner = SlowLearner(150)
    loop, drifts = online_error_events(200, learner, x[:600], y[:600])
    assert drifts == []
    learner.reset()  # the control plane resets the learner, then its monitors
    loop.serving_changed(["risk"])
    monitor = loop.monitors_for("risk", "online", "error")[0]
    seen = monitor.n_seen
    later: list[Drift] = []
    for start in range(600, 1400, 100):
        ids = [f"e{i}" for i in range(start, start + 100)]
        later += loop.scored_many(batch_of(ids, x[start : start + 100]), scored(ids, p=0.2))
        later += loop.labels_many([(i, float(y[int(i[1:])])) for i in ids])
    assert [d for d in later if d.event.version == "online"] == [], "its new first errors"
    assert monitor.n_seen == seen + 800 - 200


def test_a_serving_learners_prediction_monitor_skips_its_warm_up() -> None:
    online = settings(
        learners=[{"model": "risk", "version": "online", "warmup_labels": 300}],
        monitors=[{"signal": "prediction"}],
    )
    learner = FakeLearner("online")
    loop = make_loop(online, [learner], routes={"risk": Route.single("online")})
    ids = ids_of(400)
    # What it serves while it learns its first 300 labels moves a lot: not drift.
    values = np.array([0.9] * 200 + [0.1] * 200)
    assert loop.scored_many(batch_of(ids), [("risk", "online", ids, values)]) == []
    assert loop.monitors_for("risk", "online", "prediction")[0].n_seen == 0
    loop.labels_many([(i, 1.0) for i in ids])  # learned: 400 labels, the warm-up is over
    later = ids_of(400, "f")
    [drift] = loop.scored_many(batch_of(later), [("risk", "online", later, values)])
    assert (drift.event.signal, drift.event.rose) == ("prediction", False)


def test_an_error_that_fell_takes_no_action_whatever_the_policy() -> None:
    """On the error signal only a rise acts: a version getting better is an alert only."""
    online = settings(
        monitors=[{"signal": "error"}],
        policies=[
            {"signal": "error", "action": "rollback_canary"},
            {"signal": "error", "action": "shift_to_online", "online_version": "online"},
            {"signal": "error", "action": "reset_learner", "online_version": "online"},
        ],
    )
    split = Route(weights=(("v1", 0.9), ("v2", 0.1)))
    loop = make_loop(online, routes={"risk": split})
    ids = ids_of(400)
    loop.scored_many(batch_of(ids), scored(ids, p=0.2, version="v2"))
    [drift] = loop.labels_many([(i, 1.0 if n < 200 else 0.0) for n, i in enumerate(ids)])
    assert (drift.event.version, drift.event.rose) == ("v2", False)
    assert drift.commands == []
    # The same change the other way acts (so the policies above could).
    rising = make_loop(online, routes={"risk": split})
    rising.scored_many(batch_of(ids), scored(ids, p=0.2, version="v2"))
    [drift] = rising.labels_many([(i, 0.0 if n < 200 else 1.0) for n, i in enumerate(ids)])
    assert drift.event.rose is True
    assert [c["command"] for c in drift.commands] == ["swap", "swap", "reset_learner"]


def test_warmup_labels_defaults_to_200_and_is_validated() -> None:
    from stream_infer.errors import ConfigError
    from stream_infer.settings import parse_topology
    from tests.unit.test_settings import minimal

    doc = minimal()
    doc["topics"] = {**doc["topics"], "labels": "labels"}
    model = doc["models"][0]["name"]
    topo = parse_topology({**doc, "online": {"learners": [{"model": model}]}}, env={})
    assert topo.online.learners[0].warmup_labels == 200
    learner = {"model": model, "warmup_labels": -1}
    with pytest.raises(ConfigError, match="warmup_labels"):
        parse_topology({**doc, "online": {"learners": [learner]}}, env={})
