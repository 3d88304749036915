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

The modules are imported one by one (``from stream_infer.online.joiner import LabelJoiner``);
this package imports none of them, so using the joiner does not load river.
"""
