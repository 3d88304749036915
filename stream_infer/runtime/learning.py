"""Online learning beside serving: labels joined to what was served, prequential metrics,
River learners, ADWIN drift monitors and the policies that act on drift.

Everything here runs on one learning thread fed by a bounded queue: the inference thread
submits what each batch scored, the same thread submits the batch's label records. When
learning falls behind, the queue fills and the inference thread waits (backpressure), but for
at most ``queue_wait_s`` per item: past that, or at once when the learning thread is not
running, the item is dropped and counted (``stream_infer_learning_dropped_total``), so that
learning never stalls serving. The learning thread survives any failure of one item, of its
housekeeping or of a snapshot (logged and counted in ``stream_infer_learning_errors_total``);
:attr:`LearningService.problem` reports it dead or stalled (``/healthz``).

Drift events go to the drift topic; policy actions go to the control topic, so every action is
in the audit log and every worker applies it. They are sealed (stamped, and signed with the
topology's key) by :func:`stream_infer.core.control.seal`, as the operator's commands are.

This module is the thread and the wiring only. What one item does (join, score, learn, drift,
policy commands) is :class:`stream_infer.online.loop.LearningLoop`'s, a pure step this thread
runs; here its counts become metrics, its drift events records and its commands sealed records.
Label records are decoded by :func:`stream_infer.core.serde.decode_labels`, the metrics are
defined in :class:`stream_infer.observability.LearningMetrics`, and snapshot files (paths, when
to write, which to restore) are :class:`stream_infer.online.snapshots.SnapshotStore`'s.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import orjson

from stream_infer.core.control import seal
from stream_infer.core.events import DeadLetter, FeatureBatch, ModelVersion, OutRecord, Record
from stream_infer.core.serde import decode_labels
from stream_infer.observability import LearningMetrics, Metrics, RolloutMetrics
from stream_infer.online.learner import OnlineLearner
from stream_infer.online.loop import Drift, LearningLoop, RoutesReader, Scored
from stream_infer.online.rollout import Reader as RolloutsReader
from stream_infer.online.rollout import RolloutDriver
from stream_infer.online.snapshots import SnapshotStore
from stream_infer.settings import LearnerSettings, Topology

log = logging.getLogger(__name__)


class LearningService:
    def __init__(
        self,
        topology: Topology,
        metrics: Metrics,
        *,
        publish: Callable[[list[OutRecord]], None],
        predictors: Callable[[], Mapping[ModelVersion, Any]],
        routes: RoutesReader,
        generation: Callable[[], int] = lambda: 0,
        queue_size: int = 256,
        queue_wait_s: float = 10.0,
        stall_s: float = 60.0,
        worker: str = "worker",
        rollouts: RolloutsReader | None = None,
        worker_id: str = "",
    ) -> None:
        self.topology = topology
        self.online = topology.online
        self.metrics = LearningMetrics(metrics)
        # Label-driven rollouts: the driver is fed every joined label; it acts while this
        # worker owns input partition 0 (see stream_infer.online.rollout).
        self._rollouts = rollouts
        self.rollout_driver = RolloutDriver(worker_id or worker)
        self.rollout_metrics = RolloutMetrics(metrics)
        self._publish = publish
        self._predictors = predictors
        # Join, score, learn, drift, policy: the pure step this thread runs on each item.
        self.loop = LearningLoop(
            self.online,
            topology.features,
            learners=self._learners,
            routes=routes,
            generation=generation,
            labelled=bool(topology.topics.labels),
            wall_clock=time.time,
            clock=time.monotonic,
            on_labelled=self.rollout_driver.observe if rollouts is not None else None,
        )
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=queue_size)
        self.queue_wait_s = queue_wait_s
        self.stall_s = stall_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="learning", daemon=True)
        self._last_export = 0.0
        self._progress_at = time.monotonic()  # when the thread last took an item or idled
        # The input partitions this worker owns (set from the consumer thread; read here).
        self._owned: frozenset[int] | None = None
        folder, every_s = self.online.snapshot_dir, self.online.snapshot_interval_s
        self.snapshots = (
            SnapshotStore(folder, worker, interval_s=every_s) if folder is not None else None
        )

    # --- called from the inference thread ---------------------------------------------------

    def split_labels(
        self, records: Sequence[Record]
    ) -> tuple[list[tuple[str, float]], list[DeadLetter]]:
        """Decode a batch's label records: the labels ``(event id, label)``, and a dead letter
        (``invalid_label``) for each record that is not one. On the inference thread, so the
        dead letters go out under the batch's ticket (its offsets wait for them)."""
        decoded, dead = decode_labels(records)
        if dead:
            self.metrics.labels.labels("invalid").inc(len(dead))
        return decoded, dead

    def submit(
        self,
        batch: FeatureBatch | None,
        scored: Sequence[Scored],
        labels: Sequence[tuple[str, float]],
        partitions: Sequence[int] | None = None,
    ) -> None:
        """Hand a batch's scores (``partitions[i]``: the input partition of ``batch`` row i)
        and its labels (from :meth:`split_labels`) to the learning thread. Waits at most
        ``queue_wait_s`` per item for room; drops (and counts) what does not fit, or everything
        when the learning thread is not running."""
        if batch is not None and len(batch):
            self._put("scored", (batch, list(scored), partitions), len(batch))
        if labels:
            self._put("labels", list(labels), len(labels))

    def _put(self, kind: str, item: Any, n: int) -> None:
        deadline = time.monotonic() + self.queue_wait_s
        while self._thread.is_alive() and not self._stop.is_set():
            left = deadline - time.monotonic()
            try:
                self._queue.put((kind, item), timeout=max(0.0, min(0.1, left)))
                return
            except queue.Full:
                if left <= 0:
                    break
        self.metrics.dropped.labels(kind).inc(n)
        if kind == "labels":
            self.metrics.lost.labels("dropped").inc(n)
        log.debug("learning: %d %s dropped (queue full or thread stopped)", n, kind)

    def serving_changed(self, models: Iterable[str]) -> None:
        """What serves for these models changed (their routes, or a learner reset): their
        error and prediction monitors start afresh (in queue order, after the items scored
        before), so a policy does not take the operator's own traffic change, or a fresh
        learner's first errors, for drift. Feature monitors go on: what serves does not
        change the input."""
        changed = frozenset(models)
        if changed and self._thread.is_alive():
            self._put("routing", changed, 0)

    def assigned(self, partitions: Iterable[int]) -> None:
        """The input partitions this worker owns now (called from the consumer thread)."""
        self._owned = frozenset(partitions)

    # --- the learning thread --------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the learning thread runs (it outlives any one item's failure)."""
        return self._thread.is_alive()

    @property
    def problem(self) -> str | None:
        """Why learning needs a restart: its thread stopped, or has taken no item for
        ``stall_s`` while items wait (a learner call that hangs). None when it is healthy."""
        if not self._thread.is_alive():
            return "the online learning thread stopped: nothing more is learned"
        idle = time.monotonic() - self._progress_at
        waiting = self._queue.qsize()
        if waiting and idle >= self.stall_s:
            return (
                f"the online learning thread has taken no item for {idle:.0f} s "
                f"({waiting} waiting): scores and labels are being dropped"
            )
        return None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.snapshot()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._progress_at = time.monotonic()
            try:
                kind, item = self._queue.get(timeout=0.2)
            except queue.Empty:
                self._housekeep_safely()
                continue
            self._progress_at = time.monotonic()
            try:
                if kind == "scored":
                    self._on_scored(*item)
                elif kind == "routing":
                    self.loop.serving_changed(item)
                else:
                    self._on_labels(item)
            except Exception:  # learning must never take serving down; it is logged and counted
                self.metrics.errors.labels(kind).inc()
                log.exception("online learning failed on a %s item", kind)
            self._housekeep_safely()

    def _housekeep_safely(self) -> None:
        try:
            self._housekeeping()
        except Exception:  # a metric or expiry bug must not end learning: logged and counted
            self.metrics.errors.labels("housekeeping").inc()
            log.exception("online learning housekeeping failed")

    def _on_scored(
        self,
        batch: FeatureBatch,
        scored: list[Scored],
        partitions: Sequence[int] | None = None,
    ) -> None:
        try:
            drifts = self.loop.scored_many(batch, scored, partitions)
        finally:  # what was learned before a failure is counted too
            self._count_progress()
        self._drifted(drifts)

    def _on_labels(self, labels: list[tuple[str, float]]) -> None:
        try:
            drifts = self.loop.labels_many(labels)
        finally:
            self._count_progress()
        self._drifted(drifts)

    def _learners(self) -> list[OnlineLearner]:
        return [p for p in self._predictors().values() if isinstance(p, OnlineLearner)]

    def _count_progress(self) -> None:
        progress = self.loop.take_progress()
        if progress.joined:
            self.metrics.labels.labels("joined").inc(progress.joined)
        for key, n in progress.learned.items():
            self.metrics.learned.labels(*key).inc(n)

    def _drifted(self, drifts: list[Drift]) -> None:
        if not drifts:
            return
        drift_topic = self.topology.topics.drift
        records = []
        for drift in drifts:
            event = drift.event
            self.metrics.drift_events.labels(event.model, event.version, event.signal).inc()
            log.warning("drift: %s", event)
            if drift_topic:
                records.append(OutRecord(drift_topic, event.model.encode(), event.to_json()))
            records.extend(self._command(command) for command in drift.commands)
        self._publish(records)

    def _command(self, doc: dict[str, Any]) -> OutRecord:
        key = self.topology.control.hmac_key
        doc = seal(doc, key.get_secret_value().encode() if key else None, time.time())
        log.warning("drift policy: sending %s", doc)
        return OutRecord(self.topology.topics.control, str(doc["id"]).encode(), orjson.dumps(doc))

    # --- housekeeping -------------------------------------------------------------------------

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._last_export < 1.0:
            return
        self._last_export = now
        counts = self.loop.expire(self._owned)
        self.metrics.expired.inc(counts.expired)
        self.metrics.lost.labels("rebalance").inc(counts.moved)
        self.metrics.lost.labels("orphan").inc(counts.orphans)
        self.metrics.labels.labels("duplicate").inc(counts.duplicates)
        self.metrics.waiting.labels("early").set(counts.early)
        self.metrics.waiting.labels("pending").set(counts.pending)
        for (model, version), preq in self.loop.prequential.items():
            for metric, value in preq.report().items():
                self.metrics.prequential.labels(model, version, metric).set(value)
        self.drive_rollouts()
        if self.snapshots is not None and self.snapshots.due():
            self.snapshot()

    def drive_rollouts(self) -> None:
        """One tick of the rollout driver (learning thread, once a second): its decisions are
        sealed and published to the control topic, the metrics set."""
        if self._rollouts is None:
            return
        generation, records = self._rollouts()
        owned = self._owned
        driving = owned is not None and 0 in owned
        docs = self.rollout_driver.tick(records, generation, driving=driving, now=time.time())
        if docs:
            self._publish([self._rollout_command(doc) for doc in docs])
        m = self.rollout_metrics
        m.driver.set(1 if driving else 0)
        status = self.rollout_driver.status()["rollouts"]
        for model, record in records.items():
            running = record.outcome == "running"
            m.running.labels(model).set(1 if running else 0)
            m.step.labels(model).set(record.step if running else -1)
            m.weight.labels(model).set(record.weight)
            live = status.get(model)
            if live is None:
                continue
            metric = live["metric"]
            for version, ev in live["evidence"]["versions"].items():
                m.labels.labels(model, version).set(ev["labels"])
                for stat in ("mean", "lower", "upper"):
                    value = ev[stat]
                    m.evidence.labels(model, version, metric, stat).set(
                        float("nan") if value is None else value
                    )
            diff = live["evidence"]["difference"]
            for bound in ("lower", "upper"):
                value = diff[bound]
                m.difference.labels(model, bound).set(float("nan") if value is None else value)
            m.difference.labels(model, "margin").set(live["margin"])

    def _rollout_command(self, doc: dict[str, Any]) -> OutRecord:
        key = self.topology.control.hmac_key
        doc = seal(doc, key.get_secret_value().encode() if key else None, time.time())
        tag = doc.get("rollout", {})
        self.rollout_metrics.decisions.labels(doc.get("model", ""), tag.get("decision", "?")).inc()
        log.warning(
            "rollout %s: sending %s (%s) at step %s: %s",
            tag.get("id"),
            doc["id"],
            tag.get("decision"),
            tag.get("step"),
            tag.get("reason"),
        )
        return OutRecord(self.topology.topics.control, str(doc["id"]).encode(), orjson.dumps(doc))

    def snapshot(self) -> int:
        """Write every learner's state to this worker's snapshot files (atomically), if there
        is a snapshot folder. Never raises: a failure (full disk, no permission) is logged and
        counted, the previous snapshot stays whole, and learning goes on. Returns how many
        snapshots failed."""
        if self.snapshots is None:
            return 0
        failed = self.snapshots.write_all(self._learners())
        if failed:
            self.metrics.errors.labels("snapshot").inc(failed)
        return failed

    def learner_for(self, spec: LearnerSettings) -> OnlineLearner:
        """A learner for ``spec``: restored from a snapshot when one fits the topology (see
        :mod:`stream_infer.online.snapshots` for which), else a fresh one. A snapshot that
        cannot be used is an ERROR line and a count, never a failed start."""
        features = self.topology.features
        if self.snapshots is not None:
            found = self.snapshots.restore(
                spec.model, spec.version, features=features, kind=spec.kind, scale=spec.scale
            )
            if found.learner is not None:
                return found.learner
            if found.refused is not None:
                reason = found.reason or "corrupt"
                self.metrics.snapshots_refused.labels(spec.model, spec.version, reason).inc()
        return OnlineLearner(spec.model, spec.version, features, kind=spec.kind, scale=spec.scale)
