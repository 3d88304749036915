"""OnlineLearner: exact parity with river's own models, snapshots, validation, threads."""

from __future__ import annotations

import itertools
import threading
from typing import Any

import numpy as np
import pytest
from river import datasets, forest, linear_model, preprocessing, tree

from stream_infer.errors import ModelError
from stream_infer.online import LEARNER_KINDS
from stream_infer.online.learner import OnlineLearner

PHISHING = list(datasets.Phishing())
FEATURES = tuple(PHISHING[0][0])
X = np.array([[x[f] for f in FEATURES] for x, _ in PHISHING], dtype=np.float64)
Y = np.array([y for _, y in PHISHING], dtype=bool)


def river_model(kind: str, seed: int = 0) -> Any:
    if kind == "logistic_regression":
        return preprocessing.StandardScaler() | linear_model.LogisticRegression()
    if kind == "hoeffding_tree":
        return tree.HoeffdingTreeClassifier()
    return forest.ARFClassifier(seed=seed)


def p_true(proba: dict[Any, float]) -> float:
    return proba.get(True, 0.0) if proba else 0.5


def learn(learner: OnlineLearner, x: np.ndarray[Any, Any], y: np.ndarray[Any, Any]) -> None:
    """Learn each row of ``x`` with its label in ``y``, in order, as the runtime does (its
    learning thread gives every joined event to ``learn_one``)."""
    for row, label in zip(x.tolist(), y.tolist(), strict=True):
        learner.learn_one(dict(zip(FEATURES, row, strict=True)), label >= 0.5)


@pytest.mark.parametrize(
    ("kind", "n"), [("logistic_regression", 1250), ("hoeffding_tree", 1250), ("arf", 300)]
)
def test_one_at_a_time_matches_river_exactly(kind: str, n: int) -> None:
    learner = OnlineLearner("risk", "online", FEATURES, kind=kind, seed=3)
    reference = river_model(kind, seed=3)
    for x, y in PHISHING[:n]:
        assert learner.predict_proba_one(x) == p_true(reference.predict_proba_one(x))
        learner.learn_one(x, y)
        reference.learn_one(x, y)
    assert learner.n_learned == n


def test_batches_match_river_one_by_one_exactly() -> None:
    """predict_many per batch of 50, then learn_one on its rows, gives river's one-by-one
    predictions."""
    learner = OnlineLearner("risk", "online", FEATURES)
    reference = river_model("logistic_regression")
    got: list[float] = []
    expected: list[float] = []
    for start in range(0, len(PHISHING), 50):
        batch = slice(start, start + 50)
        got.extend(learner.predict_many(X[batch]).tolist())
        expected.extend(p_true(reference.predict_proba_one(x)) for x, _ in PHISHING[batch])
        learn(learner, X[batch], Y[batch].astype(np.float64))
        for x, y in PHISHING[batch]:
            reference.learn_one(x, y)
    assert got == expected
    final = learner.predict_many(X)
    assert final.dtype == np.float64 and final.shape == (len(PHISHING),)
    assert final.tolist() == [p_true(reference.predict_proba_one(x)) for x, _ in PHISHING]


def test_float32_batches_are_served() -> None:
    learner = OnlineLearner("risk", "online", FEATURES)
    learn(learner, X[:100].astype(np.float32), Y[:100])
    out = learner.predict_many(X[100:110].astype(np.float32))
    assert out.shape == (10,) and np.all((out >= 0) & (out <= 1))


@pytest.mark.parametrize("kind", LEARNER_KINDS)
def test_before_learning_predicts_one_half(kind: str) -> None:
    learner = OnlineLearner("risk", "online", FEATURES, kind=kind)
    assert learner.predict_many(X[:3]).tolist() == [0.5, 0.5, 0.5]


def test_unscaled_logistic_regression_is_river_logistic_regression() -> None:
    learner = OnlineLearner("risk", "online", FEATURES, scale=False)
    reference = linear_model.LogisticRegression()
    for x, y in PHISHING[:300]:
        assert learner.predict_proba_one(x) == reference.predict_proba_one(x)[True]
        learner.learn_one(x, y)
        reference.learn_one(x, y)


def test_reset_forgets() -> None:
    learner = OnlineLearner("risk", "online", FEATURES)
    learn(learner, X[:200], Y[:200])
    learner.reset()
    assert learner.n_learned == 0
    assert learner.predict_many(X[:2]).tolist() == [0.5, 0.5]


@pytest.mark.parametrize("kind", ["logistic_regression", "hoeffding_tree"])
def test_snapshot_round_trip_predicts_and_learns_identically(kind: str) -> None:
    learner = OnlineLearner("risk", "online", FEATURES, kind=kind)
    learn(learner, X[:600], Y[:600])
    restored = OnlineLearner.restore(learner.snapshot(), model="risk", version="online")
    assert (restored.model, restored.version, restored.kind) == ("risk", "online", kind)
    assert restored.features == FEATURES and restored.n_learned == 600
    assert restored.predict_many(X[600:]).tolist() == learner.predict_many(X[600:]).tolist()
    learn(learner, X[600:900], Y[600:900])
    learn(restored, X[600:900], Y[600:900])
    assert restored.predict_many(X[900:]).tolist() == learner.predict_many(X[900:]).tolist()


def _corrupt(name: str, good: bytes) -> bytes:
    flipped = bytearray(good)
    flipped[-10] ^= 0xFF
    return {
        "empty": b"",
        "truncated header": good[:20],
        "truncated payload": good[:-1],
        "trailing bytes": good + b"\x00",
        "flipped byte": bytes(flipped),
        "not a snapshot": b"\x80\x04garbage" + good[10:],
        "other format": good[:8] + b"\x00\x02" + good[10:],
    }[name]


@pytest.mark.parametrize(
    "name",
    [
        "empty",
        "truncated header",
        "truncated payload",
        "trailing bytes",
        "flipped byte",
        "not a snapshot",
        "other format",
    ],
)
def test_corrupt_snapshot_raises_model_error(name: str) -> None:
    learner = OnlineLearner("risk", "online", FEATURES)
    learn(learner, X[:50], Y[:50])
    with pytest.raises(ModelError, match="snapshot"):
        OnlineLearner.restore(_corrupt(name, learner.snapshot()))


def test_snapshot_of_another_version_raises_model_error() -> None:
    good = OnlineLearner("risk", "online", FEATURES).snapshot()
    with pytest.raises(ModelError, match="expected 'other'"):
        OnlineLearner.restore(good, version="other")


def test_invalid_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="kind"):
        OnlineLearner("risk", "online", FEATURES, kind="svm")
    with pytest.raises(ValueError, match="features"):
        OnlineLearner("risk", "online", [])
    with pytest.raises(ValueError, match="unique"):
        OnlineLearner("risk", "online", ["a", "a"])
    with pytest.raises(ValueError, match="model"):
        OnlineLearner("", "online", FEATURES)
    learner = OnlineLearner("risk", "online", FEATURES)
    with pytest.raises(ValueError, match="shape"):
        learner.predict_many(X[:, :3])
    with pytest.raises(ValueError, match="not finite"):
        learner.predict_many(np.full((2, len(FEATURES)), np.nan))
    with pytest.raises(ValueError, match="0/1"):
        learner.learn_one(PHISHING[0][0], 0.7)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="0/1"):
        learner.learn_one(PHISHING[0][0], 2)  # type: ignore[arg-type]
    assert learner.n_learned == 0


def test_predicting_while_learning_on_another_thread() -> None:
    learner = OnlineLearner("risk", "online", FEATURES)
    errors: list[BaseException] = []

    def learn_all() -> None:
        try:
            for start in itertools.islice(itertools.cycle(range(0, 1200, 100)), 30):
                learn(learner, X[start : start + 100], Y[start : start + 100])
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=learn_all)
    thread.start()
    while thread.is_alive():
        out = learner.predict_many(X[:64])
        assert out.shape == (64,) and np.isfinite(out).all()
    thread.join()
    assert errors == [] and learner.n_learned == 3000


def test_numpy_scalar_labels_are_accepted() -> None:
    learner = OnlineLearner("risk", "online", FEATURES)
    learner.learn_one(PHISHING[0][0], np.bool_(True))  # type: ignore[arg-type]
    learner.learn_one(PHISHING[1][0], np.int64(0))  # type: ignore[arg-type]
    assert learner.n_learned == 2
