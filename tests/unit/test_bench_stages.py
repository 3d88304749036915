"""The bench's latency-stage arithmetic: quantiles read from Prometheus histogram buckets (as
histogram_quantile does), the difference of two scrapes, and which stage a missed p99 names."""

from __future__ import annotations

import math
from typing import Any

import pytest

from bench import report
from bench.stages import (
    HistogramSnapshot,
    bucket_of,
    parse_histograms,
    quantile,
    slowest_stage,
    summarize,
    verdict,
)
from stream_infer.observability import Metrics

INF = math.inf
BOUNDS = (0.01, 0.02, 0.05, INF)


def test_quantile_interpolates_inside_the_bucket_holding_the_rank() -> None:
    # 10 observations: 4 in (0, 10 ms], 4 in (10, 20], 2 in (20, 50].
    cumulative = (4.0, 8.0, 10.0, 10.0)
    assert quantile(0.5, BOUNDS, cumulative) == pytest.approx(0.0125)  # rank 5: 1/4 into (10,20]
    assert quantile(0.2, BOUNDS, cumulative) == pytest.approx(0.005)  # first bucket starts at 0
    assert quantile(0.9, BOUNDS, cumulative) == pytest.approx(0.035)  # rank 9: half of (20,50]
    assert quantile(1.0, BOUNDS, cumulative) == pytest.approx(0.05)
    assert bucket_of(0.9, BOUNDS, cumulative) == (0.02, 0.05)
    assert bucket_of(0.2, BOUNDS, cumulative) == (0.0, 0.01)


def test_a_rank_in_the_inf_bucket_gives_the_highest_finite_bound() -> None:
    cumulative = (1.0, 1.0, 1.0, 100.0)
    assert quantile(0.99, BOUNDS, cumulative) == 0.05
    assert bucket_of(0.99, BOUNDS, cumulative) == (0.05, INF)


def test_an_empty_histogram_has_no_quantile_and_a_bad_q_is_refused() -> None:
    assert quantile(0.99, BOUNDS, (0.0, 0.0, 0.0, 0.0)) is None
    assert bucket_of(0.5, BOUNDS, ()) is None
    with pytest.raises(ValueError, match=r"within \[0, 1\], got 99"):
        quantile(99, BOUNDS, (1.0, 1.0, 1.0, 1.0))


def test_the_worker_exposition_parses_and_two_scrapes_subtract() -> None:
    metrics = Metrics()
    for value in (0.003, 0.004, 0.030):
        metrics.queue_wait_seconds.observe(value)
    before = parse_histograms(metrics.exposition().decode())
    for value in [0.021] * 98 + [0.044, 0.2]:  # after: 100 observations
        metrics.queue_wait_seconds.observe(value)
    metrics.fetch_delay_seconds.observe(0.007)
    after = parse_histograms(metrics.exposition().decode())

    window = after["stream_infer_queue_wait_seconds"].minus(
        before["stream_infer_queue_wait_seconds"]
    )
    assert window.count == 100 and window.total == pytest.approx(98 * 0.021 + 0.244)
    assert window.bucket(0.5) == (0.020, 0.025)
    assert window.bucket(0.99) == (0.040, 0.045)  # the 99th of 100 is 44 ms
    # labelled histograms (none here with labels) and other types are not read
    assert "stream_infer_events_in_total" not in after

    stages = summarize(before, after)
    assert stages["queue_wait"]["count"] == 100
    assert 20.0 < stages["queue_wait"]["p50_ms"] <= 25.0
    assert stages["queue_wait"]["p99_bucket_ms"] == pytest.approx([40.0, 45.0])
    assert stages["fetch_delay"]["count"] == 1  # observed after the first scrape only
    assert stages["batching"] == {"count": 0}


def test_snapshots_with_other_buckets_do_not_subtract() -> None:
    a = HistogramSnapshot((0.01, INF), (1.0, 1.0), 0.005)
    b = HistogramSnapshot((0.02, INF), (1.0, 2.0), 0.5)
    with pytest.raises(ValueError, match="buckets changed"):
        b.minus(a)


def _stages(**p99_ms: float) -> dict[str, dict[str, Any]]:
    return {key: {"p99_ms": value} for key, value in p99_ms.items()}


def test_a_missed_target_names_the_stages_over_the_bound_or_else_the_largest() -> None:
    stages = _stages(fetch_delay=12.0, batching=9.0, queue_wait=80.0, processing=3.0, model=70.0)
    # model is inside processing, not a stage of its own on the event's path
    assert slowest_stage(stages) == ("queue_wait", 80.0)
    assert verdict(stages, 35.0) == "the stage that misses most: queue wait (p99 80.0 ms)"
    stages["out_hop"] = {"p99_ms": 40.0}
    assert verdict(stages, 35.0) == (
        "the stage that misses most: queue wait (p99 80.0 ms); "
        "also over the bound by itself: out hop (to the reader) (40.0 ms)"
    )
    below = _stages(fetch_delay=20.0, batching=10.0, queue_wait=4.0, out_hop=6.0)
    assert verdict(below, 35.0) == (
        "no stage alone is over the bound; the largest: in Kafka before the fetch (p99 20.0 ms)"
    )
    assert verdict({}, 35.0) == "no stage breakdown"


def _run(broker: dict[str, Any] | None, sat: float, p99: float) -> dict[str, Any]:
    point = {
        "fraction": 0.5,
        "offered_eps": sat / 2,
        "p50_ms": p99 / 3,
        "p99_ms": p99,
        "stages": _stages(fetch_delay=p99 / 2, batching=9.0, queue_wait=2.0, out_hop=4.0),
    }
    system = {
        "label": "stream-infer (default)",
        "batching": {"max_wait_ms": 10.0},
        "saturation": {"throughput_eps": sat, "events": 1000},
        "latency": [point],
        "peak_rss_bytes": 400 * 2**20,
    }
    machine: dict[str, Any] = {"date": "today", "loadavg": [1.0, 1.0, 1.0]}
    if broker:
        machine["broker"] = broker
    return {"systems": {"stream-infer-default": system}, "machine": machine, "runs": []}


def test_results_md_shows_the_tansu_baseline_beside_the_kafka_figures() -> None:
    kafka = {"engine": "kafka", "name": "Apache Kafka", "version": "4.1.1", "nodes": 1}
    results = _run(kafka, 30_000.0, 90.0)
    baseline = _run(None, 26_297.0, 382.3)
    md = report.markdown(results, baseline)
    assert report.broker_engine(results) == "kafka" and report.broker_engine(baseline) == "tansu"
    assert "Broker: **Apache Kafka 4.1.1 (1 node" in md
    assert "| 30,000 |" in md and "*26,297*" in md  # saturation, with tansu beside it
    assert "*382.3*" in md  # tansu's p99 at its own 50 %
    # the target is missed, and the stage that alone is over the 35 ms bound is named
    assert "the stage that misses most: in Kafka before the fetch (p99 45.0 ms)" in md
    assert "tansu" not in report.markdown(results).split("## Targets")[1]  # no baseline: none
