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
