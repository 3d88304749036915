"""Prequential (test-then-train) metrics for one (model, version) of a binary classifier.

Each labelled event is scored with the prediction the version served *before* it learned that
event (for a fixed model, before any label at all), then the metrics are updated. With one
event at a time this is exactly river's ``evaluate.progressive_val_score``: the accuracy of a
model scored here equals the accuracy river reports for the same stream in the same order.

``y_pred`` is P(label = 1); the predicted class is ``y_pred > 0.5`` (a tie at 0.5 predicts 0,
as river's ``predict_one`` does for ``{False: 0.5, True: 0.5}``). Reported: ``accuracy``,
``log_loss``, ``roc_auc`` over everything, ``rolling_accuracy``, ``rolling_log_loss`` over the
last ``window`` events, and ``n``, the number of events scored.

>>> preq = Prequential(window=2)
>>> for label, p in [(1, 0.9), (0, 0.6), (1, 0.2), (1, 0.7)]:
...     preq.update_one(label, p)
>>> report = preq.report()
>>> report["n"], report["accuracy"], report["rolling_accuracy"]
(4, 0.5, 0.5)
"""

from __future__ import annotations

import threading
from typing import Any

from river import metrics, utils

# river.metrics has no annotations on these; through Any, mypy strict accepts the calls.
_metrics: Any = metrics


class Prequential:
    """Test-then-train metrics for one (model, version), cumulative and over a rolling window.

    Parameters
    ----------
    window
        The number of most recent events the rolling metrics cover.

    Updates and reports may come from different threads (learning, metrics scraping): both hold
    one lock.
    """

    def __init__(self, window: int = 1000) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            msg = f"Prequential: window must be an int >= 1, got {window!r}"
            raise ValueError(msg)
        self.window = window
        self._lock = threading.Lock()
        self._n = 0
        self._metrics: dict[str, Any] = {
            "accuracy": _metrics.Accuracy(),
            "log_loss": _metrics.LogLoss(),
            "roc_auc": _metrics.ROCAUC(),
            "rolling_accuracy": utils.Rolling(metrics.Accuracy, window_size=window),
            "rolling_log_loss": utils.Rolling(metrics.LogLoss, window_size=window),
        }

    @property
    def n(self) -> int:
        """The number of events scored."""
        return self._n

    def update_one(self, y_true: float, y_pred: float) -> None:
        """Score one labelled event with the prediction served for it before learning it."""
        if float(y_true) not in (0.0, 1.0):
            msg = f"Prequential.update_one: a classification label is 0/1, got {y_true!r}"
            raise ValueError(msg)
        label = float(y_true) == 1.0
        p = float(y_pred)
        if not 0.0 <= p <= 1.0:  # also rejects NaN
            msg = f"Prequential.update_one: a prediction is a probability in [0, 1], got {y_pred!r}"
            raise ValueError(msg)
        predicted = p > 0.5
        m = self._metrics
        with self._lock:
            m["accuracy"].update(label, predicted)
            m["rolling_accuracy"].update(label, predicted)
            m["log_loss"].update(label, p)
            m["rolling_log_loss"].update(label, p)
            m["roc_auc"].update(label, p)
            self._n += 1

    def report(self) -> dict[str, float]:
        """The metrics now, by name, and ``n``. Before any event every metric reads 0.0."""
        with self._lock:
            out: dict[str, float] = {name: float(m.get()) for name, m in self._metrics.items()}
            out["n"] = self._n
        return out
