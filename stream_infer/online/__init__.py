"""Online learning and drift detection: the pure core (no Kafka, no faust).

Labels flow: topic -> join -> learn -> score -> drift -> (policy) -> control topic.

    joiner.py       LabelJoiner: events (features + every version that served them) meet their
                    labels, in either order; bounded in count and age; duplicates counted.
    learner.py      OnlineLearner: a river classifier (logistic regression, Hoeffding tree,
                    adaptive random forest) behind the Predictor protocol; learns row by row
                    exactly as river does; checksummed snapshots.
    prequential.py  Prequential: test-then-train metrics per (model, version), cumulative and
                    rolling; equal to river's progressive_val_score on the same stream.
    drift.py        DriftMonitor: river's ADWIN on a signal (error, prediction, a feature) of
                    one (model, version), one DriftEvent per change.
    policy.py       Policy / commands_for: a DriftEvent becomes control commands (alert, roll a
                    canary back, shift traffic to the online learner, reset the learner).
    loop.py         LearningLoop: the flow above, one step per item (what a batch scored, or
                    labels), for the runtime's learning thread; returns the drift events with
                    their policy commands (unsealed) and the counts the metrics need.

The modules are imported one by one (``from stream_infer.online.joiner import LabelJoiner``);
this package imports none of them, so using the joiner does not load river.

The words a topology uses for this layer are defined here, once, and nowhere else: the learner
kinds (:data:`LearnerKind`), the drift signals (:func:`parse_signal`) and the policy actions
(:data:`PolicyAction`). The settings validate a topology with them without loading river; the
modules above check their arguments with the same definitions (and re-export them:
``learner.LEARNER_KINDS``, ``drift.parse_signal``, ``policy.POLICY_ACTIONS``).

>>> LEARNER_KINDS
('logistic_regression', 'hoeffding_tree', 'arf')
>>> parse_signal("feature:age")
('feature', 'age')
"""

from __future__ import annotations

from typing import Literal, get_args

LearnerKind = Literal["logistic_regression", "hoeffding_tree", "arf"]
"""The river models an :class:`~stream_infer.online.learner.OnlineLearner` can be."""
LEARNER_KINDS: tuple[LearnerKind, ...] = get_args(LearnerKind)

PolicyAction = Literal["alert", "rollback_canary", "shift_to_online", "reset_learner"]
"""What a :class:`~stream_infer.online.policy.Policy` does on drift."""
POLICY_ACTIONS: tuple[PolicyAction, ...] = get_args(PolicyAction)

SIGNALS = ("error", "prediction", "feature:<name>")
"""The drift signals, as :func:`parse_signal` reads them."""
FEATURE_PREFIX = "feature:"


def parse_signal(signal: str) -> tuple[str, str | None]:
    """A drift signal's kind and feature name; ValueError for anything else.

    >>> parse_signal("error")
    ('error', None)
    >>> parse_signal("prediction")
    ('prediction', None)
    >>> parse_signal("feature:")
    Traceback (most recent call last):
    ...
    ValueError: a drift signal is one of error, prediction, feature:<name>; got 'feature:'
    """
    if signal in ("error", "prediction"):
        return signal, None
    if isinstance(signal, str) and signal.startswith(FEATURE_PREFIX):
        name = signal[len(FEATURE_PREFIX) :]
        if name:
            return "feature", name
    msg = f"a drift signal is one of {', '.join(SIGNALS)}; got {signal!r}"
    raise ValueError(msg)
