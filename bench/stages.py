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

Under exactly_once (:func:`transactions`) the same scrapes give each stage of a batch's
transaction (``stream_infer_transaction_seconds{stage}``: begin, produce, send_offsets, commit,
abort) and the transactions by outcome (``stream_infer_transactions_total{outcome}``).
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


def series_key(name: str, labels: Mapping[str, str]) -> str:
    """``name`` for a label-less series, else ``name{k="v",...}`` (labels sorted)."""
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{labels[k]}"' for k in sorted(labels)) + "}"


@dataclass(frozen=True)
class Scrape:
    """One read of a worker's /metrics: its histograms and counters, by series key."""

    histograms: dict[str, HistogramSnapshot]
    counters: dict[str, float]


def parse_metrics(text: str) -> Scrape:
    """Every histogram and counter in a Prometheus text exposition. A label-less series is
    keyed by its family name (``stream_infer_queue_wait_seconds``), a labelled one by
    :func:`series_key` (``stream_infer_transaction_seconds{stage="commit"}``); a counter by its
    sample name (``stream_infer_transactions_total{outcome="committed"}``)."""
    histograms: dict[str, HistogramSnapshot] = {}
    counters: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.type == "counter":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counters[series_key(sample.name, sample.labels)] = float(sample.value)
            continue
        if family.type != "histogram":
            continue
        buckets: dict[str, list[tuple[float, float]]] = {}
        totals: dict[str, float] = {}
        for sample in family.samples:
            key = series_key(family.name, {k: v for k, v in sample.labels.items() if k != "le"})
            if sample.name.endswith("_bucket"):
                bound = float(sample.labels["le"])
                buckets.setdefault(key, []).append((bound, float(sample.value)))
            elif sample.name.endswith("_sum"):
                totals[key] = float(sample.value)
        for key, found in buckets.items():
            found.sort()
            histograms[key] = HistogramSnapshot(
                tuple(b for b, _ in found), tuple(c for _, c in found), totals.get(key, 0.0)
            )
    return Scrape(histograms, counters)


def parse_histograms(text: str) -> dict[str, HistogramSnapshot]:
    """Every histogram in a Prometheus text exposition, by series key (:func:`parse_metrics`)."""
    return parse_metrics(text).histograms


def scrape(port: int, timeout_s: float = 5.0) -> Scrape:
    """The histograms and counters of the worker whose web server listens on ``port``.
    Raises OSError."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as r:
        return parse_metrics(r.read().decode())


def _window(window: HistogramSnapshot) -> dict[str, Any]:
    """Observations, mean, p50 and p99 (ms) of one histogram window, with the p99's bucket."""
    if window.count <= 0:
        return {"count": 0}
    p50, p99, bucket = window.quantile(0.5), window.quantile(0.99), window.bucket(0.99)
    return {
        "count": int(window.count),
        "mean_ms": 1000.0 * window.total / window.count,
        "p50_ms": None if p50 is None else 1000.0 * p50,
        "p99_ms": None if p99 is None else 1000.0 * p99,
        "p99_bucket_ms": None if bucket is None else [1000.0 * b for b in bucket],
    }


def summarize(
    before: Mapping[str, HistogramSnapshot] | None, after: Mapping[str, HistogramSnapshot]
) -> dict[str, dict[str, Any]]:
    """Per worker stage: observations, mean, p50 and p99 (ms) between two scrapes, with the
    bucket holding the p99."""
    out: dict[str, dict[str, Any]] = {}
    for stage in STAGES:
        if stage.metric is None or stage.metric not in after:
            continue
        out[stage.key] = _window(after[stage.metric].minus((before or {}).get(stage.metric)))
    return out


# --- exactly_once: the transaction's stages --------------------------------------------------

TRANSACTION_METRIC = "stream_infer_transaction_seconds"
TRANSACTIONS_COUNTER = "stream_infer_transactions_total"
# In the order a batch's transaction meets them; abort only for an aborted one.
TRANSACTION_STAGES = ("begin", "produce", "send_offsets", "commit", "abort")
TRANSACTION_OUTCOMES = ("committed", "aborted", "skipped")
# "The commit": send_offsets (the group coordinator's round trips, KIP-447) + commit (the
# transaction coordinator's EndTxn and its markers). "Whole": every stage of a committed one.
COMMIT_PARTS = ("send_offsets", "commit")
WHOLE_PARTS = ("begin", "produce", "send_offsets", "commit")


def transactions(before: Scrape | None, after: Scrape) -> dict[str, Any]:
    """exactly_once: between two scrapes, each transaction stage's count, mean, p50, p99 (ms)
    and total seconds; transactions by outcome; "commit" (send_offsets + commit) and "whole"
    (begin + produce + send_offsets + commit), combined by :func:`combine`. {} when the worker
    made no transaction (at_least_once)."""
    stages: dict[str, dict[str, Any]] = {}
    for stage in TRANSACTION_STAGES:
        key = series_key(TRANSACTION_METRIC, {"stage": stage})
        if key not in after.histograms:
            continue
        earlier = before.histograms.get(key) if before is not None else None
        window = after.histograms[key].minus(earlier)
        stages[stage] = _window(window) | {"total_s": window.total}
    outcomes: dict[str, int] = {}
    for outcome in TRANSACTION_OUTCOMES:
        key = series_key(TRANSACTIONS_COUNTER, {"outcome": outcome})
        earlier_count = before.counters.get(key, 0.0) if before is not None else 0.0
        outcomes[outcome] = round(after.counters.get(key, 0.0) - earlier_count)
    if not any(s.get("count") for s in stages.values()) and not any(outcomes.values()):
        return {}
    return {
        "stages": stages,
        "outcomes": outcomes,
        "commit": combine(stages, COMMIT_PARTS),
        "whole": combine(stages, WHOLE_PARTS),
        "busy_s": sum(s.get("total_s", 0.0) for s in stages.values()),
    }


def combine(stages: Mapping[str, Mapping[str, Any]], parts: tuple[str, ...]) -> dict[str, Any]:
    """Several transaction stages as one: the mean is exact (each committed transaction passes
    every stage once); p50 and p99 are the sums of the stages' p50s and p99s, an estimate (the
    histograms do not say which observations came from the same transaction: it is exact when
    the slow ones coincide). None where a part was not observed."""
    found = [stages.get(p) or {} for p in parts]
    if not all(f.get("count") for f in found):
        return {"parts": list(parts), "p50_ms": None, "p99_ms": None, "mean_ms": None}
    return {
        "parts": list(parts),
        "count": min(int(f["count"]) for f in found),
        "mean_ms": sum(float(f["mean_ms"]) for f in found),
        "p50_ms": sum(float(f["p50_ms"] or 0.0) for f in found),
        "p99_ms": sum(float(f["p99_ms"] or 0.0) for f in found),
    }


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
