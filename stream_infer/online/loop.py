"""The online-learning loop, one step at a time: labels join what was served, are scored
test-then-train, are learned, feed the drift monitors, and drift becomes policy commands.

Labels flow: join -> score -> learn -> drift -> (policy). :class:`LearningLoop` owns the state of
that flow: the :class:`~stream_infer.online.joiner.LabelJoiner`, a
:class:`~stream_infer.online.prequential.Prequential` per :class:`ModelVersion`, the
:class:`~stream_infer.online.drift.DriftMonitor` of each (model, version, signal) and the
topology's :class:`~stream_infer.online.policy.Policy` list. Each call is one step on one item:

* :meth:`LearningLoop.scored_many`: what a batch scored. Each version's predictions feed its
  ``prediction`` monitors, the batch's columns the ``feature:<name>`` monitors; then (when
  labels come at all) the events wait in the joiner, and those that meet an early label are
  learned, as below.
* :meth:`LearningLoop.labels_many`: decoded labels; those that meet their event are learned.
* Learning a joined event: the prediction of every version that served it is scored against the
  label (its Prequential, its ``error`` monitors); every learner that did not serve it predicts
  first and is scored the same way (test, then train); then every learner learns the label.
* Warm-up: a learner that has learned fewer labels (since it was made or last reset; a restored
  snapshot keeps its count) than its ``warmup_labels`` is scored (its Prequential) but its
  ``error`` and ``prediction`` monitors skip it, so its first errors while it learns, and its
  error falling as it learns, are not taken for drift.
* Every :class:`DriftEvent` comes back as a :class:`Drift` with the command documents the
  policies ask for on it (unsealed: signing and sending them is the runtime's), in the order
  the monitors reported them: the error drift of the joins first, then the drift of the
  predictions and features of the batch.

The counts the metrics need are read, not pushed: :meth:`LearningLoop.take_progress` (joins
and learned events since the last take; taken after every item, failed ones included, so what
was learned before a failure is counted) and :meth:`LearningLoop.expire` (the joiner's
counters since the last expiry, its gauges now).

Not thread-safe and not a thread: the runtime (:mod:`stream_infer.runtime.learning`) runs it
on its one learning thread. No Kafka, no metrics, no hidden clock: ``wall_clock`` stamps what
was served and the drift events, ``clock`` (monotonic) ages the joiner's entries.

A serving version whose error jumps from 0 to 1 is swapped for the online learner:

>>> import numpy as np
>>> from stream_infer.core.events import FeatureBatch
>>> from stream_infer.core.routing import Route
>>> from stream_infer.settings import OnlineSettings
>>> online = OnlineSettings.model_validate({
...     "monitors": [{"signal": "error"}],
...     "policies": [{"signal": "error", "action": "shift_to_online", "online_version": "online"}],
... })
>>> loop = LearningLoop(online, ("a",), learners=lambda: [],
...     routes=lambda: {"risk": Route.single("v1")}, wall_clock=lambda: 0.0)
>>> ids = [f"e{i}" for i in range(400)]
>>> x = np.zeros((400, 1), np.float32)
>>> batch = FeatureBatch(ids, [b"k"] * 400, [None] * 400, list(range(400)), x)
>>> loop.scored_many(batch, [("risk", "v1", ids, np.full(400, 0.2))])
[]
>>> [drift] = loop.labels_many([(i, 0.0 if n < 200 else 1.0) for n, i in enumerate(ids)])
>>> drift.event.version, drift.event.at, drift.event.rose
('v1', 223, True)
>>> [(c["command"], c["model"], c["version"]) for c in drift.commands]
[('swap', 'risk', 'online')]
>>> loop.take_progress().joined, loop.take_progress().joined
(400, 0)
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from stream_infer.core.events import FeatureBatch, ModelVersion
from stream_infer.core.routing import Route
from stream_infer.online.drift import FEATURE_PREFIX, DriftEvent, DriftMonitor, error_of
from stream_infer.online.joiner import Joined, LabelJoiner, Served
from stream_infer.online.policy import Policy, commands_for
from stream_infer.online.prequential import Prequential
from stream_infer.settings import OnlineSettings

Scored = tuple[str, str, list[str], Any] | tuple[str, str, list[str], Any, int]
"""What one version scored in a batch: model, version, the event ids, their predictions (NaN
where it failed) and, from the pipeline, the routing table's generation that served them."""

RoutesReader = Callable[[], Mapping[str, Route]]
"""Reads the routes in force, which a policy judges a drift against."""


class Learner(Protocol):
    """What the loop needs of an online learner (:class:`~stream_infer.online.learner.
    OnlineLearner` is one)."""

    model: str
    version: str

    @property
    def n_learned(self) -> int:
        """Labels learned since the learner was made or last reset (its warm-up counts them)."""
        ...

    def predict_proba_one(self, x: Mapping[str, float]) -> float: ...

    def learn_one(self, x: Mapping[str, float], y: bool) -> None: ...


@dataclass(frozen=True, slots=True)
class Drift:
    """A drift event and the command documents the policies ask for on it (unsealed)."""

    event: DriftEvent
    commands: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Progress:
    """What was joined and learned since the last :meth:`LearningLoop.take_progress`."""

    joined: int = 0
    learned: dict[ModelVersion, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class JoinCounts:
    """The joiner since the last :meth:`LearningLoop.expire`: ``expired`` events given up on
    (expired or evicted), ``moved`` of them whose partition another worker owns, ``orphans``
    early labels that expired without their event, ``duplicates`` labels of ids already
    joined; and the gauges now, ``early`` labels and ``pending`` events waiting."""

    expired: int
    moved: int
    orphans: int
    duplicates: int
    early: int
    pending: int


class LearningLoop:
    """The online-learning state of one worker and the steps that move it.

    Parameters
    ----------
    online
        The topology's online settings: the joiner's bounds, the monitors, the policies, the
        prequential window.
    features
        The feature names, in the column order of a batch's ``x``.
    learners
        Reads the online learners that exist now (called once per step that joins).
    routes, generation
        Read the routes in force and the routing table's generation, for the policies'
        commands (called per drift event and policy, as the commands are made).
    labelled
        Whether labels come at all (the topology has a labels topic): without, served events
        are not kept for a join.
    wall_clock
        Seconds since the epoch: when an event was served, when a drift was detected.
    clock
        Monotonic seconds: the age of the joiner's entries.
    on_labelled
        Called with (model, version, label, prediction, the routing table's generation that
        served it: -1 when unknown) for each version that served (or shadowed) a joined event,
        a failed prediction (NaN) too, before it is scored: a rollout driver's evidence.
    """

    def __init__(
        self,
        online: OnlineSettings,
        features: Sequence[str],
        *,
        learners: Callable[[], Sequence[Learner]],
        routes: RoutesReader,
        generation: Callable[[], int] = lambda: 0,
        labelled: bool = True,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        on_labelled: Callable[[str, str, float, float, int], None] | None = None,
    ) -> None:
        self.online = online
        self.features = tuple(features)
        self.learners = learners
        self.routes = routes
        self.generation = generation
        self.labelled = labelled
        self.wall_clock = wall_clock
        self.clock = clock
        # Every joined label with the prediction of each version that served or shadowed its
        # event (model, version, label, prediction (NaN: failed), the routing generation that
        # served it): a rollout driver's evidence.
        self.on_labelled = on_labelled
        self.joiner = LabelJoiner(online.label_ttl_s, online.max_pending, clock=clock)
        self.prequential: dict[ModelVersion, Prequential] = {}
        self.monitors: dict[tuple[str, str, str], DriftMonitor] = {}
        self.policies = [
            Policy(p.signal, p.action, p.model, p.online_version) for p in online.policies
        ]
        self._warmup = {ModelVersion(x.model, x.version): x.warmup_labels for x in online.learners}
        self._joined = 0
        self._learned: Counter[ModelVersion] = Counter()
        self._expired_seen = 0
        self._moved_seen = 0
        self._orphans_seen = 0
        self._dup_seen = 0

    # -- steps -----------------------------------------------------------------------------------

    def scored_many(
        self,
        batch: FeatureBatch,
        scored: Sequence[Scored],
        partitions: Sequence[int] | None = None,
    ) -> list[Drift]:
        """A batch's predictions (``scored``) and rows (``batch``; ``partitions[i]`` the input
        partition of row i): the prediction and feature monitors are fed, the events wait for
        their labels, and those whose label came first are learned."""
        served: list[Served] = []
        now = self.wall_clock()
        events: list[DriftEvent] = []
        learners: dict[ModelVersion, Learner] | None = None  # read once, when first needed
        for item in scored:
            model, version, ids, values = item[0], item[1], item[2], item[3]
            generation = item[4] if len(item) == 5 else -1
            flat = np.asarray(values, dtype=np.float64).reshape(len(ids), -1)[:, 0]
            served.extend(
                Served(event_id, model, version, float(v), now, generation)
                for event_id, v in zip(ids, flat.tolist(), strict=True)
            )
            monitors = self.monitors_for(model, version, "prediction")
            if monitors:
                learners = self._learners_by_key() if learners is None else learners
                if self._warming_up(learners.get(ModelVersion(model, version))):
                    continue
            finite = flat[np.isfinite(flat)]  # a failed row (NaN) is a rollout's, not drift's
            for monitor in monitors:
                events += monitor.update_many(finite.tolist())
        for name in self.features:
            signal = f"{FEATURE_PREFIX}{name}"
            if any(m.signal == signal for m in self.online.monitors):
                column = batch.x[:, self.features.index(name)].tolist()
                for monitor in self.monitors_for("*", "*", signal):
                    events += monitor.update_many(column)
        drifts: list[Drift] = []
        if self.labelled:
            drifts = self._learn(self.joiner.add_event_many(batch.ids, batch.x, served, partitions))
        return drifts + self._acted(events)

    def labels_many(self, labels: Iterable[tuple[str, float]]) -> list[Drift]:
        """Decoded labels ``(event id, label)``: those whose event waits are learned; the rest
        wait as early labels (or are counted as duplicates)."""
        joined: list[Joined] = []
        for event_id, label in labels:
            match = self.joiner.add_label_one(event_id, label)
            if match is not None:
                joined.append(match)
        return self._learn(joined)

    def serving_changed(self, models: Iterable[str]) -> None:
        """What serves for these models changed: their error and prediction monitors start
        afresh (a traffic change, or a fresh learner's first errors, is not drift). Feature
        monitors go on: what serves does not change the input."""
        changed = frozenset(models)
        for (model, _version, signal), monitor in self.monitors.items():
            if model in changed and not signal.startswith(FEATURE_PREFIX):
                monitor.reset()

    def expire(self, owned: Container[int] | None = None) -> JoinCounts:
        """Drop the joiner's entries older than its ttl (``owned``: the input partitions this
        worker owns now, None when not known) and say what it did since the last expiry."""
        self.joiner.expire(owned)
        joiner = self.joiner
        expired = joiner.expired + joiner.evicted
        moved, orphans, duplicates = (
            joiner.expired_moved,
            joiner.expired_labels,
            joiner.duplicate_labels,
        )
        counts = JoinCounts(
            expired=expired - self._expired_seen,
            moved=moved - self._moved_seen,
            orphans=orphans - self._orphans_seen,
            duplicates=duplicates - self._dup_seen,
            early=joiner.early,
            pending=joiner.pending,
        )
        self._expired_seen, self._moved_seen = expired, moved
        self._orphans_seen, self._dup_seen = orphans, duplicates
        return counts

    def take_progress(self) -> Progress:
        """The joins and learned events since the last take (then zero again)."""
        progress = Progress(self._joined, dict(self._learned))
        self._joined = 0
        self._learned = Counter()
        return progress

    def monitors_for(self, model: str, version: str, signal: str) -> list[DriftMonitor]:
        """The monitors of ``signal`` of model/version, one per monitor setting of that signal
        (made on first use; none when no setting names the signal)."""
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
                    clock=self.wall_clock,
                    grace=spec.grace,
                    sample_every=spec.sample_every,
                )
            out.append(self.monitors[key])
        return out

    # -- inside a step ---------------------------------------------------------------------------

    def _learn(self, joined: list[Joined]) -> list[Drift]:
        if not joined:
            return []
        self._joined += len(joined)
        learners = self._learners_by_key()
        events: list[DriftEvent] = []
        for item in joined:
            scored_by: set[ModelVersion] = set()
            for s in item.served:
                key = ModelVersion(s.model, s.version)
                if self.on_labelled is not None:  # a failed prediction (NaN) too: it counts
                    self.on_labelled(s.model, s.version, item.label, s.prediction, s.generation)
                if not math.isfinite(s.prediction):  # the version failed on this event
                    continue
                scored_by.add(key)
                watched = not self._warming_up(learners.get(key))
                events += self._score(key, item.label, s.prediction, watched=watched)
            x = dict(zip(self.features, item.features, strict=True))
            for key, learner in learners.items():
                if key not in scored_by:  # not serving: test, then train, on this label
                    p = learner.predict_proba_one(x)
                    events += self._score(key, item.label, p, watched=not self._warming_up(learner))
                learner.learn_one(x, item.label >= 0.5)
                self._learned[key] += 1
        return self._acted(events)

    def _learners_by_key(self) -> dict[ModelVersion, Learner]:
        return {ModelVersion(x.model, x.version): x for x in self.learners()}

    def _warming_up(self, learner: Learner | None) -> bool:
        """Whether ``learner`` (None: not a learner) has learned fewer labels than its
        ``warmup_labels``: its error and prediction monitors do not count it yet."""
        if learner is None:
            return False
        warmup = self._warmup.get(ModelVersion(learner.model, learner.version), 0)
        return learner.n_learned < warmup

    def _score(
        self, key: ModelVersion, label: float, prediction: float, *, watched: bool = True
    ) -> list[DriftEvent]:
        """Score one labelled prediction of ``key``: its Prequential always, its error monitors
        when ``watched`` (not a learner in its warm-up)."""
        if key not in self.prequential:
            self.prequential[key] = Prequential(self.online.metrics_window)
        self.prequential[key].update_one(label, prediction)
        if not watched:
            return []
        error = error_of(label, prediction)
        events = []
        for monitor in self.monitors_for(key.model, key.version, "error"):
            event = monitor.update_one(error)
            if event is not None:
                events.append(event)
        return events

    def _acted(self, events: list[DriftEvent]) -> list[Drift]:
        drifts = []
        for event in events:
            commands: list[dict[str, Any]] = []
            for policy in self.policies:
                routes, generation = self.routes(), self.generation()
                commands += commands_for(policy, event, routes, generation=generation)
            drifts.append(Drift(event, commands))
        return drifts
