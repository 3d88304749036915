"""Prometheus metrics and logging set-up: the one place a worker's metrics are defined.

Names follow Prometheus conventions (``stream_infer_..._total``, ``..._seconds``). Each worker
owns a :class:`Metrics` with its own registry, served by the worker's web endpoint; with online
learning, :class:`LearningMetrics` adds the learning thread's metrics to that registry.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from stream_infer.core.events import BatchResult

# Each histogram's buckets fit what it measures (seconds), with steps of <= 25-50 % where its
# values usually fall, so a quantile read from the buckets means something:
# a model call on one micro-batch: tens of microseconds on a small model, up to the watchdog's
# limit (limits.inference_timeout_s) on a stuck one.
_INFERENCE_BUCKETS = (
    *(0.00005, 0.0001, 0.00015, 0.0002, 0.0003, 0.0004, 0.0005, 0.00075),
    *(0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.010, 0.015, 0.020, 0.030),
    *(0.050, 0.075, 0.100, 0.150, 0.250, 0.500, 1.0, 2.5, 5.0, 10.0, 30.0),
)
# A stage of the serving path (fetch delay, batching, queue wait, delivery): from under a
# millisecond to the max_wait_ms scale (5 ms apart around the p99 target of max_wait + 25 ms),
# then up to minutes: a delivery may wait limits.max_unacked_s (300 s) before it is a stall.
_STAGE_BUCKETS = (
    *(0.0001, 0.00025, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008),
    *(0.010, 0.0125, 0.015, 0.0175, 0.020, 0.025, 0.030, 0.035, 0.040, 0.045, 0.050),
    *(0.060, 0.070, 0.080, 0.090, 0.100, 0.125, 0.150, 0.200, 0.250, 0.350, 0.500),
    *(0.750, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
)
# Event time to prediction: milliseconds when the worker keeps up, minutes behind a backlog
# (the overload test measured 160 s); the top bucket is 30 minutes.
_END_TO_END_BUCKETS = (
    *(0.001, 0.002, 0.005, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040, 0.050),
    *(0.060, 0.080, 0.100, 0.150, 0.200, 0.300, 0.500, 0.750, 1.0, 2.0, 5.0, 10.0),
    *(20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0),
)
_BATCH_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # The standard process and platform collectors (resident memory, CPU seconds, open file
        # descriptors, start time; the Python version), as every Prometheus client exports them.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.build = Info(
            "stream_infer_build",
            "The stream-infer, Python, torch and librdkafka versions this worker runs",
            registry=r,
        )
        self.build.info(build_info())
        self.events_in = Counter(
            "stream_infer_events_in_total", "Records consumed from the input topic", registry=r
        )
        self.predictions = Counter(
            "stream_infer_predictions_total",
            "Predictions published",
            ["model", "version"],
            registry=r,
        )
        self.shadow_predictions = Counter(
            "stream_infer_shadow_predictions_total",
            "Shadow predictions published",
            ["model", "version"],
            registry=r,
        )
        self.dead_letters = Counter(
            "stream_infer_dead_letters_total",
            "Records sent to the dead-letter topic",
            ["reason"],
            registry=r,
        )
        self.delivery_retries = Counter(
            "stream_infer_delivery_retries_total",
            "Produced records retried",
            ["topic", "error"],
            registry=r,
        )
        self.inference_timeouts = Counter(
            "stream_infer_inference_timeouts_total",
            "Model calls abandoned after limits.inference_timeout_s",
            ["model", "version"],
            registry=r,
        )
        self.hung_calls = Gauge(
            "stream_infer_hung_inference_calls",
            "Model calls past their time limit that have not returned (their threads are lost)",
            ["model", "version"],
            registry=r,
        )
        self.batch_size = Histogram(
            "stream_infer_batch_size",
            "Records per micro-batch",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "stream_infer_inference_seconds",
            "Model time per micro-batch",
            buckets=_INFERENCE_BUCKETS,
            registry=r,
        )
        self.process_seconds = Histogram(
            "stream_infer_batch_process_seconds",
            "Decode + route + infer + encode time per micro-batch",
            buckets=_INFERENCE_BUCKETS,
            registry=r,
        )
        self.fetch_delay_seconds = Histogram(
            "stream_infer_fetch_delay_seconds",
            "Record timestamp to the consumer thread receiving it, per fetched chunk (its oldest "
            "record): producer linger, broker, fetch wait and the client's prefetch queue",
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.batching_seconds = Histogram(
            "stream_infer_batching_seconds",
            "First record of a batch received to the closed batch handed over: the batcher's "
            "wait (<= max_wait_ms) plus any backpressure pause",
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "stream_infer_queue_wait_seconds",
            "Time a closed batch waited before processing began",
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.delivery_seconds = Histogram(
            "stream_infer_delivery_seconds",
            "Time from publishing a batch to the broker acknowledging all of it",
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.transaction_seconds = Histogram(
            "stream_infer_transaction_seconds",
            "exactly_once: time one batch's transaction spent in each stage (begin, produce, "
            "send_offsets, commit, abort)",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.transactions = Counter(
            "stream_infer_transactions_total",
            "exactly_once: batches' transactions by outcome (committed, aborted, skipped: "
            "after an aborted one, read again)",
            ["outcome"],
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            "stream_infer_end_to_end_seconds",
            "Event ts to prediction produced (events that carry ts)",
            buckets=_END_TO_END_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "stream_infer_batches_in_flight", "Batches consumed and not yet committed", registry=r
        )
        self.access_refused = Gauge(
            "stream_infer_kafka_access_refused",
            "Topics and groups on which Kafka refuses this worker a permission it needs (ACLs;"
            " named in /healthz and the log)",
            registry=r,
        )
        self.source_backpressure_seconds = Counter(
            "stream_infer_source_backpressure_seconds_total",
            "Time the consumer thread paused, every in-flight slot taken (backpressure)",
            registry=r,
        )
        self.consumer_lag = Gauge(
            "stream_infer_consumer_lag",
            "Records of the input partitions not yet served and delivered: end offset minus the "
            "offset stored for commit, as Kafka counts a group's lag (end minus committed, up to "
            "one 500 ms auto-commit); measured every 5 s",
            ["partition"],
            registry=r,
        )
        self.route_weight = Gauge(
            "stream_infer_route_weight",
            "Traffic weight in force",
            ["model", "version"],
            registry=r,
        )
        self.assigned_partitions = Gauge(
            "stream_infer_assigned_partitions", "Input partitions this worker owns", registry=r
        )
        self.routing_changed = Gauge(
            "stream_infer_routing_changed_timestamp_seconds",
            "When the routing in force last changed (unix time)",
            registry=r,
        )
        self.control_commands = Counter(
            "stream_infer_control_commands_total",
            "Live control commands by outcome (the replay at start is not counted)",
            ["command", "status"],
            registry=r,
        )
        self.ready = Gauge(
            "stream_infer_ready", "1 when routing is restored and models are warm", registry=r
        )

    def observe_batch(self, result: BatchResult, process_s: float) -> None:
        self.events_in.inc(result.n_in)
        self.batch_size.observe(result.n_in)
        self.process_seconds.observe(process_s)
        self.inference_seconds.observe(result.inference_s)
        for (model, version), n in result.served.items():
            self.predictions.labels(model, version).inc(n)
        for (model, version), n in result.shadowed.items():
            self.shadow_predictions.labels(model, version).inc(n)
        for letter in result.dead_letters:
            self.dead_letters.labels(letter.reason).inc()

    def observe_latency(self, event_ts: list[float], now: float, sample: int = 64) -> None:
        """End-to-end latency of a batch's events that carry ``ts``: an evenly spaced sample of
        at most ``sample`` of them, so the cost per batch stays bounded."""
        step = max(1, len(event_ts) // sample)
        for ts in event_ts[::step]:
            self.end_to_end_seconds.observe(max(0.0, now - ts))

    def set_routes(self, weights: Mapping[str, Mapping[str, float]]) -> None:
        self.route_weight.clear()
        for model, versions in weights.items():
            for version, weight in versions.items():
                self.route_weight.labels(model, version).set(weight)

    def set_consumer_lag(self, lag: Mapping[tuple[str, int], int], input_topic: str) -> None:
        """The input partitions' lag, from ``{(topic, partition): records behind}``. The
        consumer also owns the labels topic's partitions, which share partition numbers: they
        are left out, or they would overwrite the input's figures."""
        self.consumer_lag.clear()
        for (topic, partition), behind in lag.items():
            if topic == input_topic:
                self.consumer_lag.labels(str(partition)).set(behind)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def build_info() -> dict[str, str]:
    """Versions, read from the installed packages' metadata (torch is not imported here)."""
    from importlib import metadata

    import confluent_kafka

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "unknown"

    return {
        "version": version("stream-infer"),
        "python": platform.python_version(),
        "torch": version("torch"),
        "librdkafka": confluent_kafka.libversion()[0],
    }


class LearningMetrics:
    """The online-learning metrics (stream_infer.runtime.learning), registered in a worker's
    :class:`Metrics` registry when its topology enables online learning."""

    def __init__(self, metrics: Metrics) -> None:
        r = self.registry = metrics.registry
        self.labels = Counter(
            "stream_infer_labels_total",
            "Labels by outcome: joined, duplicate, invalid",
            ["status"],
            registry=r,
        )
        self.waiting = Gauge(
            "stream_infer_labels_waiting",
            "Labels that arrived before their event and wait for it (early), and events that"
            " wait for their label (pending)",
            ["kind"],
            registry=r,
        )
        self.expired = Counter(
            "stream_infer_labels_missed_total",
            "Events whose label never came within the TTL (or evicted)",
            registry=r,
        )
        self.learned = Counter(
            "stream_infer_learner_learned_total",
            "Labelled events learned",
            ["model", "version"],
            registry=r,
        )
        self.prequential = Gauge(
            "stream_infer_prequential",
            "Prequential (test-then-train) metrics per version",
            ["model", "version", "metric"],
            registry=r,
        )
        self.drift_events = Counter(
            "stream_infer_drift_events_total",
            "Drift events published",
            ["model", "version", "signal"],
            registry=r,
        )
        self.lost = Counter(
            "stream_infer_labels_lost_total",
            "Joins lost, by cause: rebalance (an event expired unlabelled after its partition"
            " moved to another worker), orphan (a label expired waiting for an event this worker"
            " never saw: moved, lost in a restart, or keyed unlike it), dropped (labels dropped"
            " from a full learning queue or with the learning thread stopped)",
            ["cause"],
            registry=r,
        )
        self.dropped = Counter(
            "stream_infer_learning_dropped_total",
            "Scored events and labels not handed to the learning thread (queue full for"
            " queue_wait_s, or the thread not running)",
            ["kind"],
            registry=r,
        )
        self.errors = Counter(
            "stream_infer_learning_errors_total",
            "Failures on the learning thread, by stage (scored, labels, housekeeping, snapshot);"
            " the thread goes on",
            ["stage"],
            registry=r,
        )
        self.snapshots_refused = Counter(
            "stream_infer_learner_snapshots_refused_total",
            "Learner snapshots not restored at start (unreadable, corrupt, mismatch: made for"
            " another topology); the learner started afresh",
            ["model", "version", "reason"],
            registry=r,
        )


class RolloutMetrics:
    """The metrics of label-driven rollouts (stream_infer.online.rollout), registered beside
    :class:`LearningMetrics`. Step and weight come from the control log (every worker shows the
    same); the evidence, the driver flag and the decisions from the driving worker (0 / absent
    elsewhere: take the max over workers)."""

    def __init__(self, metrics: Metrics) -> None:
        r = self.registry = metrics.registry
        self.step = Gauge(
            "stream_infer_rollout_step",
            "The current step (index into the plan) of the model's running rollout; -1: none",
            ["model"],
            registry=r,
        )
        self.weight = Gauge(
            "stream_infer_rollout_weight",
            "The candidate's traffic share at the rollout's step (0: shadow, or finished "
            "without a promotion); 1 once promoted",
            ["model"],
            registry=r,
        )
        self.running = Gauge(
            "stream_infer_rollout_running",
            "1 while the model's rollout runs (held included), else 0",
            ["model"],
            registry=r,
        )
        self.driver = Gauge(
            "stream_infer_rollout_driver",
            "1 on the worker that drives the rollouts (it owns input partition 0), else 0",
            registry=r,
        )
        self.labels = Gauge(
            "stream_infer_rollout_labels",
            "Labels in the driver's evidence for the running rollout, per version",
            ["model", "version"],
            registry=r,
        )
        self.evidence = Gauge(
            "stream_infer_rollout_evidence",
            "The driver's evidence per version: the mean loss of the rollout's metric (log_loss"
            ": log loss; accuracy: error rate; roc_auc: 1 - AUC over pairs) and its anytime-valid"
            " bounds (stat mean, lower, upper)",
            ["model", "version", "metric", "stat"],
            registry=r,
        )
        self.difference = Gauge(
            "stream_infer_rollout_difference",
            "Bounds on mean loss(candidate) - mean loss(incumbent) (bound lower, upper) and the"
            " margin the gate compares them with (bound margin)",
            ["model", "bound"],
            registry=r,
        )
        self.decisions = Counter(
            "stream_infer_rollout_decisions_total",
            "Step commands this worker wrote as a rollout's driver, by decision (advance, hold,"
            " promote, abort)",
            ["model", "decision"],
            registry=r,
        )


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
