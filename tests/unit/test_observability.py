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


def _buckets(metrics: Metrics, name: str) -> list[float]:
    family = next(f for f in metrics.registry.collect() if f.name == name)
    return [
        float(s.labels["le"])
        for s in family.samples
        if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"
    ]


def test_each_histogram_has_buckets_that_fit_what_it_measures() -> None:
    """Issue seen: six histograms shared 1 ms to 5 s buckets, so end-to-end latency saturated
    at 5 s (160 s was measured under overload) and most inference times fell in one bucket."""
    metrics = Metrics()
    inference = _buckets(metrics, "stream_infer_inference_seconds")
    assert sum(b < 0.001 for b in inference) >= 6  # a small model: tens of microseconds
    assert max(inference) >= 30.0  # up to a hung call's limit
    end_to_end = _buckets(metrics, "stream_infer_end_to_end_seconds")
    assert max(end_to_end) >= 600.0  # minutes behind a backlog
    assert sum(0.010 <= b <= 0.050 for b in end_to_end) >= 6  # around the p99 target
    delivery = _buckets(metrics, "stream_infer_delivery_seconds")
    assert max(delivery) >= 300.0  # limits.max_unacked_s
    for name in ("batching", "queue_wait", "fetch_delay", "delivery"):
        assert _buckets(metrics, f"stream_infer_{name}_seconds")[0] <= 0.0001, name


def test_process_collectors_and_build_info_are_exported() -> None:
    text = Metrics().exposition().decode()
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "python_info"):
        assert f"\n{name}" in text, name
    info = next(line for line in text.splitlines() if line.startswith("stream_infer_build_info{"))
    for label in ("version=", "python=", "torch=", "librdkafka="):
        assert label in info, info
    assert 'torch="unknown"' not in info
