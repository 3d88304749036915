from __future__ import annotations

from stream_infer.observability import Metrics


def _lag(metrics: Metrics) -> dict[str, float]:
    return {
        s.labels["partition"]: s.value
        for family in metrics.registry.collect()
        if family.name == "stream_infer_consumer_lag"
        for s in family.samples
    }


def test_consumer_lag_reports_the_input_partitions_not_the_labels_ones() -> None:
    """The worker's consumer owns the input and labels partitions, numbered alike: the labels
    topic's (often 0) must not overwrite the input's figures."""
    metrics = Metrics()
    lag = {
        ("app.features", 0): 1200,
        ("app.features", 1): 7,
        ("app.labels", 0): 0,
        ("app.labels", 1): 0,
    }
    metrics.set_consumer_lag(lag, "app.features")
    assert _lag(metrics) == {"0": 1200.0, "1": 7.0}


def test_consumer_lag_drops_partitions_no_longer_owned() -> None:
    metrics = Metrics()
    metrics.set_consumer_lag({("in", 0): 5, ("in", 1): 6}, "in")
    metrics.set_consumer_lag({("in", 1): 2}, "in")
    assert _lag(metrics) == {"1": 2.0}
