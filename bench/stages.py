"""Where a stream-infer worker's latency goes, from its own /metrics.

The worker keeps a Prometheus histogram per stage of an event's way through it (see
``stream_infer/observability.py``). The bench scrapes ``/metrics`` when a latency phase's
warm-up ends and again when every prediction has arrived, and reads each stage's p50 and p99
from the difference, the way Prometheus's ``histogram_quantile`` does: find the bucket holding
the rank, interpolate linearly inside it. So a quantile is only known to within its bucket; the
bucket is reported with it (the worker's buckets are at most 25 % wide from 1 to 100 ms).

The stages, in the order an event meets them (all but the last two per batch or per fetched
chunk, each for the batch's or chunk's oldest event, so their quantiles are per batch, not per
event):

- ``fetch_delay``: the input record's timestamp (set by the load generator's producer as it
  produces the event) to the worker's consumer thread receiving it: producer linger, broker,
  fetch wait and librdkafka's prefetch queue. Whole-millisecond timestamps: up to 1 ms more.
- ``batching``: received to the closed batch handed over: the batcher's wait (at most
  ``max_wait_ms``) and any backpressure pause.
- ``queue_wait``: handed over to processing start (the batches ahead in the inference thread).
- ``processing``: decode, route, infer, encode and the produce calls; ``model`` is the model's
  share of it.
- ``delivery``: produce to the broker acknowledging the batch (and every batch before it: the
  worker waits in order, to commit in order). The reader may see a prediction before its
  acknowledgement arrives, so this runs beside ``out_hop``, not before it.
- ``worker_end_to_end``: the event's ``ts`` to its prediction produced (a sample of at most 64
  events per batch): the first four stages together, per event.
- ``out_hop`` (measured by the bench's reader, per event, exact): the prediction record's
  timestamp (set as the worker produces it) to the reader receiving it.
"""

from __future__ import annotations

import math
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Stage:
    key: str
    metric: str | None  # the worker's histogram; None: measured by the reader
    label: str
    on_path: bool  # on the way from the event's ts to the reader's arrival stamp


STAGES: tuple[Stage, ...] = (
    Stage("fetch_delay", "stream_infer_fetch_delay_seconds", "in Kafka before the fetch", True),
    Stage("batching", "stream_infer_batching_seconds", "batching", True),
    Stage("queue_wait", "stream_infer_queue_wait_seconds", "queue wait", True),
    Stage("processing", "stream_infer_batch_process_seconds", "processing", True),
    Stage("model", "stream_infer_inference_seconds", "of which the model", False),
    Stage("delivery", "stream_infer_delivery_seconds", "delivery (to the ack)", False),
    Stage("worker_end_to_end", "stream_infer_end_to_end_seconds", "worker end to end", False),
    Stage("out_hop", None, "out hop (to the reader)", True),
)
STAGE_LABELS = {s.key: s.label for s in STAGES}


@dataclass(frozen=True)
class HistogramSnapshot:
    """One histogram: ascending upper bounds (the last is +Inf) and cumulative counts."""

    bounds: tuple[float, ...]
    cumulative: tuple[float, ...]
    total: float  # the sum of the observations

    @property
    def count(self) -> float:
        return self.cumulative[-1] if self.cumulative else 0.0

    def minus(self, earlier: HistogramSnapshot | None) -> HistogramSnapshot:
        """The observations made after ``earlier`` (same buckets)."""
        if earlier is None:
            return self
        if earlier.bounds != self.bounds:
            msg = f"histogram buckets changed between scrapes: {earlier.bounds} -> {self.bounds}"
            raise ValueError(msg)
        return HistogramSnapshot(
            self.bounds,
            tuple(a - b for a, b in zip(self.cumulative, earlier.cumulative, strict=True)),
            self.total - earlier.total,
        )

    def quantile(self, q: float) -> float | None:
        return quantile(q, self.bounds, self.cumulative)

    def bucket(self, q: float) -> tuple[float, float] | None:
        return bucket_of(q, self.bounds, self.cumulative)


def _rank_index(q: float, cumulative: tuple[float, ...]) -> tuple[int, float] | None:
    if not 0.0 <= q <= 1.0:
        msg = f"quantile must be within [0, 1], got {q}"
        raise ValueError(msg)
    if not cumulative or cumulative[-1] <= 0:
        return None
    rank = q * cumulative[-1]
    index = next(i for i, c in enumerate(cumulative) if c >= rank)
    return index, rank


def quantile(q: float, bounds: tuple[float, ...], cumulative: tuple[float, ...]) -> float | None:
    """Prometheus's ``histogram_quantile``: the bucket holding rank ``q * count``, linearly
    interpolated from its lower bound (0 for the first bucket); a rank in the +Inf bucket gives
    the highest finite bound. None when the histogram is empty."""
    found = _rank_index(q, cumulative)
    if found is None:
        return None
    i, rank = found
    if math.isinf(bounds[i]):
        return bounds[i - 1] if i > 0 else None
    lower = bounds[i - 1] if i > 0 else 0.0
    below = cumulative[i - 1] if i > 0 else 0.0
    inside = cumulative[i] - below
    if inside <= 0:
        return lower
    return lower + (bounds[i] - lower) * (rank - below) / inside


def bucket_of(
    q: float, bounds: tuple[float, ...], cumulative: tuple[float, ...]
) -> tuple[float, float] | None:
    """(lower, upper) bounds of the bucket holding the quantile: its resolution."""
    found = _rank_index(q, cumulative)
    if found is None:
        return None
    i, _rank = found
    return (bounds[i - 1] if i > 0 else 0.0), bounds[i]


def parse_histograms(text: str) -> dict[str, HistogramSnapshot]:
    """Every label-less histogram in a Prometheus text exposition, by family name."""
    out: dict[str, HistogramSnapshot] = {}
    for family in text_string_to_metric_families(text):
        if family.type != "histogram":
            continue
        buckets: list[tuple[float, float]] = []
        total = 0.0
        labelled = False
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k != "le"}
            labelled = labelled or bool(labels)
            if sample.name.endswith("_bucket"):
                buckets.append((float(sample.labels["le"]), float(sample.value)))
            elif sample.name.endswith("_sum"):
                total = float(sample.value)
        if buckets and not labelled:
            buckets.sort()
            out[family.name] = HistogramSnapshot(
                tuple(b for b, _ in buckets), tuple(c for _, c in buckets), total
            )
    return out


def scrape(port: int, timeout_s: float = 5.0) -> dict[str, HistogramSnapshot]:
    """The histograms of the worker whose web server listens on ``port``. Raises OSError."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as r:
        return parse_histograms(r.read().decode())


def summarize(
    before: Mapping[str, HistogramSnapshot] | None, after: Mapping[str, HistogramSnapshot]
) -> dict[str, dict[str, Any]]:
    """Per worker stage: observations, mean, p50 and p99 (ms) between two scrapes, with the
    bucket holding the p99."""
    out: dict[str, dict[str, Any]] = {}
    for stage in STAGES:
        if stage.metric is None or stage.metric not in after:
            continue
        window = after[stage.metric].minus((before or {}).get(stage.metric))
        if window.count <= 0:
            out[stage.key] = {"count": 0}
            continue
        p50, p99, bucket = window.quantile(0.5), window.quantile(0.99), window.bucket(0.99)
        out[stage.key] = {
            "count": int(window.count),
            "mean_ms": 1000.0 * window.total / window.count,
            "p50_ms": None if p50 is None else 1000.0 * p50,
            "p99_ms": None if p99 is None else 1000.0 * p99,
            "p99_bucket_ms": None if bucket is None else [1000.0 * b for b in bucket],
        }
    return out


def slowest_stage(stages: Mapping[str, Mapping[str, Any]]) -> tuple[str, float] | None:
    """The on-path stage with the highest p99 (key, ms): where a missed target's time went."""
    found = [
        (s.key, float(stages[s.key]["p99_ms"]))
        for s in STAGES
        if s.on_path and stages.get(s.key, {}).get("p99_ms") is not None
    ]
    return max(found, key=lambda kv: kv[1]) if found else None


def verdict(stages: Mapping[str, Mapping[str, Any]], bound_ms: float) -> str:
    """For a p99 over ``bound_ms``: the on-path stage with the highest p99 (the one that misses
    most), and any other whose p99 alone is over the bound."""
    slow = slowest_stage(stages)
    if slow is None:
        return "no stage breakdown"
    key, ms = slow
    others = [
        f"{s.label} ({float(stages[s.key]['p99_ms']):.1f} ms)"
        for s in STAGES
        if s.on_path
        and s.key != key
        and stages.get(s.key, {}).get("p99_ms") is not None
        and float(stages[s.key]["p99_ms"]) > bound_ms
    ]
    largest = f"{STAGE_LABELS[key]} (p99 {ms:.1f} ms)"
    if ms <= bound_ms:
        return f"no stage alone is over the bound; the largest: {largest}"
    named = f"the stage that misses most: {largest}"
    return named + (f"; also over the bound by itself: {', '.join(others)}" if others else "")
