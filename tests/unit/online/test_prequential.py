"""Prequential: parity with river's progressive_val_score, rolling windows."""

from __future__ import annotations

import math

import pytest
from river import datasets, evaluate, linear_model, metrics, preprocessing

from stream_infer.online.learner import OnlineLearner
from stream_infer.online.prequential import Prequential

FEATURES = tuple(next(iter(datasets.Phishing()))[0])


def river_score(metric: metrics.base.Metric) -> float:
    model = preprocessing.StandardScaler() | linear_model.LogisticRegression()
    return float(evaluate.progressive_val_score(datasets.Phishing(), model, metric).get())


def test_test_then_train_on_phishing_equals_progressive_val_score() -> None:
    """The in-memory parity the Kafka integration test mirrors: same stream, same order."""
    learner = OnlineLearner("phishing", "online", FEATURES)
    preq = Prequential(window=100)
    for x, y in datasets.Phishing():
        preq.update_one(float(y), learner.predict_proba_one(x))
        learner.learn_one(x, y)
    report = preq.report()
    assert report["n"] == 1250
    assert report["accuracy"] == river_score(metrics.Accuracy())
    assert report["log_loss"] == river_score(metrics.LogLoss())
    assert report["roc_auc"] == river_score(metrics.ROCAUC())
    assert 0.85 < report["accuracy"] < 1.0  # the known value is about 0.89


def test_rolling_metrics_cover_the_last_window() -> None:
    preq = Prequential(window=3)
    labels = [1, 0, 1, 1, 0]
    probas = [0.9, 0.6, 0.2, 0.7, 0.1]
    for y, p in zip(labels, probas, strict=True):
        preq.update_one(y, p)
    report = preq.report()
    assert report["accuracy"] == pytest.approx(3 / 5)
    assert report["rolling_accuracy"] == pytest.approx(2 / 3)  # (1, .2) wrong, (1, .7), (0, .1)
    expected = -(math.log(0.2) + math.log(0.7) + math.log(0.9)) / 3
    assert report["rolling_log_loss"] == pytest.approx(expected)


def test_a_probability_of_one_half_predicts_zero() -> None:
    """As river's predict_one does on {False: .5, True: .5}: the first event of a fresh model."""
    preq = Prequential()
    preq.update_one(0.0, 0.5)
    assert preq.report()["accuracy"] == 1.0


def test_report_before_any_event() -> None:
    report = Prequential().report()
    assert set(report) == {
        "n",
        "accuracy",
        "log_loss",
        "roc_auc",
        "rolling_accuracy",
        "rolling_log_loss",
    }
    assert report["n"] == 0


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="window"):
        Prequential(window=0)
    preq = Prequential()
    with pytest.raises(ValueError, match="0/1"):
        preq.update_one(0.3, 0.5)
    with pytest.raises(ValueError, match="probability"):
        preq.update_one(1.0, 1.5)
    with pytest.raises(ValueError, match="probability"):
        preq.update_one(1.0, float("nan"))
    assert preq.report()["n"] == 0
