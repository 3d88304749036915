"""Online learning beside serving: labels joined to what was served, prequential metrics,
River learners, ADWIN drift monitors and the policies that act on drift.

Everything here runs on one learning thread fed by a bounded queue: the inference thread
submits what each batch scored, the same thread submits the batch's label records. When
learning falls behind, the queue fills and the inference thread waits (backpressure), so
nothing is dropped. Drift events go to the drift topic; policy actions go to the control topic,
so every action is in the audit log and every worker applies it.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from prometheus_client import Counter, Gauge

from stream_infer import serde
from stream_infer.control import sign
from stream_infer.events import DeadLetter, FeatureBatch, OutRecord, Record
from stream_infer.observability import Metrics
from stream_infer.online.drift import DriftEvent, DriftMonitor, error_of
from stream_infer.online.joiner import Joined, LabelJoiner, Served
from stream_infer.online.learner import OnlineLearner
from stream_infer.online.policy import Policy, commands_for
from stream_infer.online.prequential import Prequential
from stream_infer.routing import Route
from stream_infer.settings import Topology

log = logging.getLogger(__name__)

INVALID_LABEL = "invalid_label"


class LearningMetrics:
    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
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


def decode_label(raw: bytes | None) -> tuple[str, float]:
    """``{"id": str, "label": number | bool}`` -> (id, label). Raises ValueError."""
    try:
        doc = orjson.loads(raw or b"")
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError("a label is a JSON object")
    event_id, label = doc.get("id"), doc.get("label")
    if not isinstance(event_id, str) or not event_id:
        raise ValueError("'id' must be a non-empty string")
    if not isinstance(label, (bool, int, float)) or not math.isfinite(label):
        raise ValueError(f"'label' must be a number or a boolean, got {label!r}")
    return event_id, float(label)


class LearningService:
    def __init__(
        self,
        topology: Topology,
        metrics: Metrics,
        *,
        publish: Callable[[list[OutRecord]], None],
        predictors: Callable[[], Mapping[tuple[str, str], Any]],
        routes: Callable[[], Mapping[str, Route]],
        queue_size: int = 256,
    ) -> None:
        self.topology = topology
        self.online = topology.online
        self.metrics = LearningMetrics(metrics)
        self._publish = publish
        self._predictors = predictors
        self._routes = routes
        self.joiner = LabelJoiner(self.online.label_ttl_s, self.online.max_pending)
        self.prequential: dict[tuple[str, str], Prequential] = {}
        self.monitors: dict[tuple[str, str, str], DriftMonitor] = {}
        self.policies = [
            Policy(p.signal, p.action, p.model, p.online_version) for p in self.online.policies
        ]
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="learning", daemon=True)
        self._last_export = 0.0
        self._last_snapshot = time.monotonic()
        self._expired_seen = 0
        self._dup_seen = 0

    # --- called from the inference thread ---------------------------------------------------

    def submit(
        self,
        batch: FeatureBatch | None,
        scored: Sequence[tuple[str, str, list[str], Any]],
        labels: Sequence[Record],
    ) -> None:
        if batch is not None and len(batch):
            self._queue.put(("scored", (batch, list(scored))))
        if labels:
            self._queue.put(("labels", list(labels)))

    # --- the learning thread --------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the learning thread runs (it outlives any one item's failure)."""
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.snapshot()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                kind, item = self._queue.get(timeout=0.2)
            except queue.Empty:
                self._housekeeping()
                continue
            try:
                if kind == "scored":
                    self._on_scored(*item)
                else:
                    self._on_labels(item)
            except Exception:  # learning must never take serving down; it is logged and counted
                log.exception("online learning failed on a %s item", kind)
            self._housekeeping()

    def _monitor(self, model: str, version: str, signal: str) -> list[DriftMonitor]:
        out = []
        for spec in self.online.monitors:
            if spec.signal != signal:
                continue
            key = (model, version, signal)
            if key not in self.monitors:
                self.monitors[key] = DriftMonitor(
                    model,
                    version,
                    signal,
                    delta=spec.delta,
                    grace=spec.grace,
                    sample_every=spec.sample_every,
                )
            out.append(self.monitors[key])
        return out

    def _on_scored(
        self, batch: FeatureBatch, scored: list[tuple[str, str, list[str], Any]]
    ) -> None:
        served: list[Served] = []
        now = time.time()
        events: list[DriftEvent] = []
        for model, version, ids, values in scored:
            flat = np.asarray(values, dtype=np.float64).reshape(len(ids), -1)[:, 0]
            served.extend(
                Served(event_id, model, version, float(v), now)
                for event_id, v in zip(ids, flat.tolist(), strict=True)
            )
            for monitor in self._monitor(model, version, "prediction"):
                events += monitor.update_many(flat.tolist())
        for name in self.topology.features:
            signal = f"feature:{name}"
            if any(m.signal == signal for m in self.online.monitors):
                column = batch.x[:, self.topology.features.index(name)].tolist()
                for monitor in self._monitor("*", "*", signal):
                    events += monitor.update_many(column)
        if self.topology.topics.labels:
            self._on_joined(self.joiner.add_event_many(batch.ids, batch.x, served))
        self._drifted(events)

    def _on_labels(self, records: list[Record]) -> None:
        joined: list[Joined] = []
        dead: list[OutRecord] = []
        for record in records:
            try:
                event_id, label = decode_label(record.value())
            except ValueError as exc:
                self.metrics.labels.labels("invalid").inc()
                letter = DeadLetter(INVALID_LABEL, str(exc), record)
                dead.append(
                    OutRecord(
                        self.topology.topics.dead_letter,
                        record.key(),
                        serde.encode_dead_letter(letter),
                    )
                )
                continue
            match = self.joiner.add_label_one(event_id, label)
            if match is not None:
                joined.append(match)
        if dead:
            self._publish(dead)
        self._on_joined(joined)

    def _learners(self) -> list[OnlineLearner]:
        return [p for p in self._predictors().values() if isinstance(p, OnlineLearner)]

    def _on_joined(self, joined: list[Joined]) -> None:
        if not joined:
            return
        self.metrics.labels.labels("joined").inc(len(joined))
        learners = self._learners()
        features = self.topology.features
        events: list[DriftEvent] = []
        for item in joined:
            scored_by = set()
            for s in item.served:
                scored_by.add((s.model, s.version))
                events += self._score(s.model, s.version, item.label, s.prediction)
            x = dict(zip(features, item.features, strict=True))
            for learner in learners:
                key = (learner.model, learner.version)
                if key not in scored_by:  # not serving: test, then train, on this label
                    events += self._score(*key, item.label, learner.predict_proba_one(x))
                learner.learn_one(x, item.label >= 0.5)
                self.metrics.learned.labels(*key).inc()
        self._drifted(events)

    def _score(self, model: str, version: str, label: float, prediction: float) -> list[DriftEvent]:
        key = (model, version)
        if key not in self.prequential:
            self.prequential[key] = Prequential("classification", self.online.metrics_window)
        self.prequential[key].update_one(label, prediction)
        error = error_of("classification", label, prediction)
        events = []
        for monitor in self._monitor(model, version, "error"):
            event = monitor.update_one(error)
            if event is not None:
                events.append(event)
        return events

    def _drifted(self, events: list[DriftEvent]) -> None:
        if not events:
            return
        drift_topic = self.topology.topics.drift
        records = []
        for event in events:
            self.metrics.drift_events.labels(event.model, event.version, event.signal).inc()
            log.warning("drift: %s", event)
            if drift_topic:
                records.append(OutRecord(drift_topic, event.model.encode(), event.to_json()))
            for policy in self.policies:
                if policy.signal != event.signal or policy.model not in (None, event.model):
                    continue
                for command in commands_for(policy, event, self._routes()):
                    records.append(self._command(command))
        self._publish(records)

    def _command(self, doc: dict[str, Any]) -> OutRecord:
        key = self.topology.control.hmac_key
        if key is not None:
            doc = doc | {"signature": sign(doc, key.get_secret_value().encode())}
        log.warning("drift policy: sending %s", doc)
        return OutRecord(self.topology.topics.control, str(doc["id"]).encode(), orjson.dumps(doc))

    # --- housekeeping -------------------------------------------------------------------------

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._last_export < 1.0:
            return
        self._last_export = now
        self.joiner.expire()
        expired = self.joiner.expired + self.joiner.evicted
        self.metrics.expired.inc(expired - self._expired_seen)
        self._expired_seen = expired
        self.metrics.labels.labels("duplicate").inc(self.joiner.duplicate_labels - self._dup_seen)
        self._dup_seen = self.joiner.duplicate_labels
        self.metrics.waiting.labels("early").set(self.joiner.early)
        self.metrics.waiting.labels("pending").set(self.joiner.pending)
        for (model, version), preq in self.prequential.items():
            for metric, value in preq.report().items():
                self.metrics.prequential.labels(model, version, metric).set(value)
        if now - self._last_snapshot >= self.online.snapshot_interval_s:
            self._last_snapshot = now
            self.snapshot()

    def snapshot(self) -> None:
        """Write every learner's state to the snapshot folder (atomically), if there is one."""
        folder = self.online.snapshot_dir
        if folder is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        for learner in self._learners():
            path = snapshot_path(folder, learner.model, learner.version)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(learner.snapshot())
            tmp.replace(path)


def snapshot_path(folder: Path, model: str, version: str) -> Path:
    return folder / f"{model}--{version}.snapshot"
