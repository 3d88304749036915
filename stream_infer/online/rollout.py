"""The driver of label-driven rollouts: joined labels become evidence, and the gate's decisions
become control commands. Pure: no Kafka, no metrics, no hidden clock.

A ``rollout`` command in the control log starts a rollout (:mod:`stream_infer.core.control`
keeps its record, the same on every worker). Exactly one worker drives it: the one whose
consumer owns partition 0 of the input topic (the runtime says so with ``driving``). The
driver is fed, on the learning thread, every labelled prediction its worker joins
(:meth:`RolloutDriver.observe`): the candidate's and the incumbent's, whether they served the
event or shadowed it. Each :meth:`RolloutDriver.tick` adds them to the rollout's
:class:`~stream_infer.core.rollout.Evidence`, asks :func:`~stream_infer.core.rollout.next_action`
what to do, and returns the command documents to publish (unsealed):

    ADVANCE  ``split`` to the next step's weight (weight 1: the candidate alone)
    PROMOTE  ``swap`` to the candidate
    ABORT    ``swap`` to the incumbent (the table routes what served before the rollout)
    HOLD     ``rollout`` with ``"action": "hold"`` (no routing change)

Each carries a ``"rollout"`` tag (the rollout's id, the step, the decision, the reason and the
evidence: per version the labels, the mean loss, its confidence bounds and the confidence
sequence's six sums; the driving worker; whether its evidence was restored from the log),
``if_generation`` (the routing table's generation it was decided at) and
an id derived from both (:func:`rollout_command_id`): two drivers that decide the same at the
same generation (a rebalance, briefly, can make two) mint the same id and the log applies one
copy; a copy decided from an older table is rejected ``stale``.

Every joined label feeds the confidence sequences, but a step's ``min_labels`` counts only
the labels of events a routing of the step's generation or later served (the serving
snapshot's routing generation, carried with each scored event, against the record's
``step_generation``; what served the event, not a clock): labels of events an earlier step
served, still arriving, do not pass a step that has not yet served anything.

Each step also has an :class:`~stream_infer.core.rollout.Evidence` of its own, over the labels
its routing served (a later step's labels are not drowned by many earlier ones): the step
aborts when its own bounds say the candidate is worse by more than the margin (at a weight-1
step against the incumbent's whole-rollout bounds). A session's level ``alpha_k`` goes half to
the whole rollout's sequences and half to the steps' (:func:`step_alpha`).

A version's failures count against it: an event it failed on (the model raised, timed out or
returned a non-finite value: NaN from the pipeline) or answered outside ``[0, 1]`` is evidence
as the most wrong answer (``1 - label``; counted in ``invalid_predictions``), never left out.

The evidence is what this worker joins: the labels of the events of the input partitions it
owns (each worker joins the labels of its own partitions). With N workers the gate sees about
1/N of the labels, a fixed set of keys; ``min_labels`` counts those.

Takeover. Every driving session begins with a logged ``rollout`` command with
``"action": "takeover"`` (the first driver's too), and decides nothing until the log has
applied it. The table counts the sessions (the record's ``sessions``) and starts the step's
clock again (a new driver is not timed out by the time its predecessor spent), never past one
more ``max_duration`` after the step began or was resumed. A session lasts while the log's
latest takeover is its own, its evidence in memory going on: losing partition 0 for less than
``grace_s`` (an eager rebalance revokes it, then assigns it again) does not end it (it decides
nothing meanwhile). Another driver's takeover in the log ends it. No driver takes over within
``resend_s`` of first seeing another driver's takeover (by its own clock): that one may still
drive, and two drivers at once (a rebalance's split-brain window) take over from each other at
most once per ``resend_s``, whatever their clocks say; a driver that died is replaced
``resend_s`` after its successor first looks. A session decides nothing, and feeds no label
into its evidence, until the log applied its takeover (labels joined in the tick before are
used). Session ``k``
runs its confidence sequences at level ``alpha_k = alpha * 6 / (pi^2 k^2)``
(:func:`session_alpha`): a restarted or rebuilt sequence is a fresh look at the data, and
summed over every session the levels stay under ``alpha``. A driver that dies loses its
partitions; the worker that gets partition 0 becomes the driver and rebuilds the rollout from
the log: the step and the label counts it began at come from the record, and the evidence from
the last step command's tag (its sequences' sums resume where they were when that command was
written; labels the old driver joined after it are lost, and the new driver's own labels from
before the takeover are not used); a rollout with no step command yet starts its evidence
afresh. A session's level is never used by a second, fresh sequence.

A driver that has sent a command waits for the log to apply it (``resend_s``: after that it
decides again; an unchanged decision at an unchanged generation has the same id, so a copy is
harmless).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from stream_infer.core.control import RolloutRecord
from stream_infer.core.rollout import (
    Action,
    ActionKind,
    Evidence,
    RolloutState,
    Side,
    next_action,
)

log = logging.getLogger(__name__)

MAX_BUFFERED = 1_000_000  # labelled predictions waiting for a tick, per version (then dropped)


def rollout_command_id(rollout_id: str, step: int, decision: str, generation: int) -> str:
    """The id of a driver's step command: ``rollout-`` and 32 hex digits of a digest of the
    rollout, the step, the decision and the generation it was decided at; the same on every
    driver that decides the same.

    >>> rollout_command_id("cmd-1", 2, "advance", 7)
    'rollout-a89b7183f8f151e3b3441e6c3458a311'
    """
    body = orjson.dumps([rollout_id, step, decision, generation])
    return f"rollout-{hashlib.sha256(body).hexdigest()[:32]}"


@dataclass
class _Session:
    """This driver's hold on one rollout: its evidence, the log's last command it follows, and
    the command it sent that the log has not applied yet."""

    rollout_id: str
    evidence: Evidence
    synced: str  # the record's last command this evidence follows
    restored: bool  # the evidence came from a step command's tag
    pending: tuple[str, float, int] | None = None  # (command id, when sent, its generation)
    last: Action | None = None
    last_at: float = 0.0
    dropped: int = 0  # labels not buffered (MAX_BUFFERED reached before a tick)
    invalid: int = 0  # failed or out-of-range predictions, counted as the most wrong answer
    # Labels of events served since the current step began, per side: the step's own count.
    step_key: tuple[int, int] = (-1, -1)
    at_step: dict[str, int] = field(default_factory=lambda: {"candidate": 0, "incumbent": 0})
    # This session is the record's ``session``-th; it decides nothing until the log has
    # applied its takeover (``active``).
    session: int = 1
    active: bool = False
    takeover_id: str = ""  # the command that began it, once the log applied it
    sent: set[str] = field(default_factory=set)  # the takeovers sent to begin it (resends)
    yielding_until: float | None = None  # no takeover before: another driver's is recent
    # The step's own evidence: the labels the step's routing served, from the step's start,
    # in sequences of their own (a later step's labels are not drowned by earlier ones).
    step_evidence: Evidence | None = None


@dataclass
class _Buffer:
    labels: list[float] = field(default_factory=list)
    probas: list[float] = field(default_factory=list)
    generations: list[int] = field(default_factory=list)
    dropped: int = 0


class RolloutDriver:
    """Turns labelled predictions into rollout decisions for this worker, while it drives.

    Not thread-safe: :meth:`observe` and :meth:`tick` run on the learning thread;
    :meth:`status` returns a copy made by the last tick (safe to read from any thread).
    """

    def __init__(self, worker: str = "", resend_s: float = 10.0, grace_s: float = 60.0) -> None:
        self.worker = worker  # named in each step command's tag: who decided it
        self.resend_s = resend_s
        # How long sessions outlive a loss of partition 0 (an eager rebalance revokes every
        # partition and assigns them again): back within it, the session goes on.
        self.grace_s = grace_s
        self.driving = False
        self._lost_at: float | None = None
        self._sessions: dict[str, _Session] = {}
        self._watched: dict[tuple[str, str], Side] = {}
        self._buffers: dict[tuple[str, str], _Buffer] = {}
        self._takeovers_sent = 0  # in each takeover's id: a resend never repeats a refused id
        self._sent: set[str] = set()  # every takeover this driver sent (its own never waits)
        # Per model, the log's latest takeover of another driver and when this one first saw
        # it (see _session).
        self._other: dict[str, tuple[str, float]] = {}
        # ... and this driver's own nonce: two workers with the same name (a fixed hostname,
        # pid 1 in containers) never mint the same takeover.
        self._nonce = uuid.uuid4().hex
        self._status: dict[str, Any] = {"driving": False, "rollouts": {}}

    # -- the learning thread ---------------------------------------------------------------

    def observe(
        self, model: str, version: str, label: float, proba: float, generation: int = -1
    ) -> None:
        """One joined label, the prediction ``version`` made for its event (NaN: it failed on
        it) and the routing table's generation that served it (negative: unknown, counted as
        served at the current step)."""
        key = (model, version)
        if key not in self._watched:
            return
        buf = self._buffers.setdefault(key, _Buffer())
        if len(buf.labels) >= MAX_BUFFERED:
            buf.dropped += 1  # counted: the session shows it
            return
        buf.labels.append(1.0 if label >= 0.5 else 0.0)
        buf.probas.append(proba)
        buf.generations.append(generation)

    def tick(
        self,
        records: Mapping[str, RolloutRecord],
        generation: int,
        *,
        driving: bool,
        now: float,
    ) -> list[dict[str, Any]]:
        """The commands to publish now (unsealed). ``records``: the routing table's rollouts
        at ``generation``; ``driving``: whether this worker drives (owns input partition 0);
        ``now``: seconds since the epoch (the clock the step times are in)."""
        self.driving = driving
        running = {m: r for m, r in records.items() if r.outcome == "running"}
        if not driving:
            if self._lost_at is None:
                self._lost_at = now
            self._status = {"driving": False, "rollouts": {}}
            if self._sessions and now - self._lost_at < self.grace_s:
                # Partition 0 may come back (a rebalance revokes it first): the sessions wait,
                # still buffering this worker's labels, and decide nothing meanwhile. Back, a
                # session whose log has not moved goes on; one that another driver moved is
                # rebuilt from the log (:meth:`_session`).
                return []
            self._sessions.clear()
            self._other.clear()
            self._buffers.clear()
            self._watched = {}
            return []
        self._lost_at = None
        self._watched = {}
        for model, record in running.items():
            self._watched[(model, record.candidate)] = "candidate"
            self._watched[(model, record.incumbent)] = "incumbent"
        for model in list(self._sessions):
            if model not in running:
                del self._sessions[model]
        out: list[dict[str, Any]] = []
        for model, record in running.items():
            session = self._session(record, now)
            if session.active:
                self._feed(model, record, session)
            else:  # labels joined before this session's takeover are not its evidence
                for version in (record.candidate, record.incumbent):
                    self._buffers.pop((model, version), None)
            doc = self._decide(record, session, generation, now)
            if doc is not None:
                out.append(doc)
        self._buffers = {k: v for k, v in self._buffers.items() if k in self._watched}
        self._status = {
            "driving": True,
            "rollouts": {m: self._describe(r, self._sessions[m]) for m, r in running.items()},
        }
        return out

    def status(self) -> dict[str, Any]:
        """This worker's view: whether it drives, and per running rollout its live evidence
        and its last decision (what ``status`` acks and the metrics show)."""
        return self._status

    # -- inside a tick ---------------------------------------------------------------------

    def _session(self, record: RolloutRecord, now: float) -> _Session:
        """This worker's session of ``record``'s rollout. A session is the log's as long as the
        log's latest takeover is the one that began it: its evidence in memory goes on (the
        log moved by its own commands, an operator's resume). Any other case is a new session
        rebuilt from the log (never a fresh sequence at a level already used)."""
        session = self._sessions.get(record.model)
        yielding: float | None = None  # the next session's: see _decide
        if session is not None and session.rollout_id == record.id:
            yielding = session.yielding_until
            if record.last_command == session.synced:
                return session
            latest = _latest_takeover(record)
            if session.active and latest == session.takeover_id:
                if session.pending is not None and record.last_command == session.pending[0]:
                    session.pending = None
                session.synced = record.last_command
                return session
            if not session.active and latest in session.sent and record.sessions == session.session:
                # one of our takeovers (a resend's, or the first landing late) began it
                session.synced, session.pending = record.last_command, None
                session.active, session.takeover_id = True, str(latest)
                return session
            if session.active:
                log.warning(
                    "rollout %s of %s: another driver took over (%s); session %d ends",
                    record.id,
                    record.model,
                    latest,
                    session.session,
                )
        latest = _latest_takeover(record)
        if latest is not None and latest not in self._sent:
            # Another driver took over (after ours, winning a race with ours, or before this
            # worker drove): it may still drive. No takeover until resend_s after this driver
            # first saw it (by its own clock: the takeover's time in the log is the other
            # driver's clock, which may be behind). Two drivers at once take over from each
            # other at most once per resend_s; a driver that died is replaced resend_s after
            # its successor first looks.
            other = self._other.get(record.model)
            if other is None or other[0] != latest:
                other = (latest, now)
                self._other[record.model] = other
            yielding = max(yielding or 0.0, other[1] + self.resend_s)
        session = self._rebuilt(record)
        session.yielding_until = yielding
        self._sessions[record.model] = session
        return session

    def _rebuilt(self, record: RolloutRecord) -> _Session:
        """A session from the log alone: the evidence of the last step command's tag, at the
        level of the session it will be once its takeover is applied (the next one)."""
        plan = record.plan
        k = record.sessions + 1
        alpha = session_alpha(plan.alpha, k)
        # Half of the session's level for the whole rollout's sequences, half for the steps'.
        evidence, restored = Evidence(plan.metric, alpha / 2.0, plan.clip), False
        if record.evidence is not None:
            try:
                evidence = Evidence.restored(plan.metric, alpha / 2.0, record.evidence, plan.clip)
                restored = True
            except ValueError as exc:
                log.warning(
                    "rollout %s: the evidence of %s cannot be restored (%s); starting afresh",
                    record.id,
                    record.last_command,
                    exc,
                )
        log.info(
            "rollout %s of %s: taking over from the control log at step %d (%s evidence; "
            "session %d, level %.3g)",
            record.id,
            record.model,
            record.step,
            "restored" if restored else "fresh",
            k,
            alpha,
        )
        # Labels counted before this session are not in its evidence: they start afresh.
        self._buffers = {key: v for key, v in self._buffers.items() if key[0] != record.model}
        return _Session(record.id, evidence, record.last_command, restored, session=k)

    def _feed(self, model: str, record: RolloutRecord, session: _Session) -> None:
        sides: tuple[tuple[str, Side], ...] = (
            (record.candidate, "candidate"),
            (record.incumbent, "incumbent"),
        )
        step_key = (record.step, record.step_generation)
        plan = record.plan
        if session.step_key != step_key or session.step_evidence is None:
            # a new step (or a new session): its own count and evidence start afresh
            session.step_key = step_key
            session.at_step = {"candidate": 0, "incumbent": 0}
            level = step_alpha(session_alpha(plan.alpha, session.session), record.step)
            session.step_evidence = Evidence(plan.metric, level, plan.clip)
        for version, side in sides:
            buf = self._buffers.pop((model, version), None)
            if buf is None:
                continue
            session.dropped += buf.dropped
            if not buf.labels:
                continue
            labels, probas, served = buf.labels, buf.probas, buf.generations
            ok = [0.0 <= p <= 1.0 for p in probas]  # NaN fails both comparisons
            if not all(ok):
                # The version failed on the event (raised, timed out, non-finite: NaN) or
                # answered outside [0, 1]: it counts against it, as the most wrong answer
                # (1 - label: the largest loss of log loss and accuracy; for roc_auc a score
                # that loses its pair, or ties one as wrong).
                session.invalid += ok.count(False)
                probas = [
                    p if good else 1.0 - y for y, p, good in zip(labels, probas, ok, strict=True)
                ]
            session.evidence.add_many(side, labels, probas)
            # Every label feeds the confidence sequence (an event the version scored is a
            # sample of its loss, whenever it was served); only the labels of events a routing
            # of the step's generation or later served count toward the step's min_labels.
            began = record.step_generation
            mine = [g < 0 or g >= began for g in served]
            session.at_step[side] += mine.count(True)
            if not all(mine):
                labels = [y for y, m in zip(labels, mine, strict=True) if m]
                probas = [p for p, m in zip(probas, mine, strict=True) if m]
            session.step_evidence.add_many(side, labels, probas)

    def _decide(
        self, record: RolloutRecord, session: _Session, generation: int, now: float
    ) -> dict[str, Any] | None:
        if session.pending is not None:
            _id, sent_at, decided_at = session.pending
            # Not applied yet: wait for it, unless the table has moved on since (another
            # command made it stale: decide again now) or resend_s has passed.
            if generation == decided_at and now - sent_at < self.resend_s:
                return None
            session.pending = None
        if not session.active:  # first, the log says this session drives (and counts it)
            # Another driver took over less than resend_s ago (see _session): wait.
            if session.yielding_until is not None and now < session.yielding_until:
                return None
            doc = self._takeover(record, session, generation)
            session.pending = (str(doc["id"]), now, generation)
            session.sent.add(str(doc["id"]))
            self._sent.add(str(doc["id"]))
            return doc
        state = RolloutState(
            step=record.step,
            step_started_s=record.step_started_at,
            n_candidate_before=record.base[0],
            n_incumbent_before=record.base[1],
            held=record.held,
        )
        view = session.evidence.view()
        # The gate counts, at this step, the labels of events served since it began: labels of
        # events an earlier step served (still arriving) feed the bounds, not the step's count.
        view = replace(
            view,
            n_candidate=record.base[0] + session.at_step["candidate"],
            n_incumbent=record.base[1] + session.at_step["incumbent"],
        )
        action, _after = next_action(record.plan, state, view, now)
        worse = _worse_at_step(record, session)
        if worse is not None and action.kind is not ActionKind.ABORT:
            action = Action(ActionKind.ABORT, record.step, None, worse, action.evidence)
        session.last, session.last_at = action, now
        if action.kind is ActionKind.STAY:
            return None
        doc = self._command(record, session, action, generation)
        session.pending = (str(doc["id"]), now, generation)
        log.info(
            "rollout %s of %s: %s at step %d (%s)",
            record.id,
            record.model,
            action.kind.value,
            action.step,
            action.reason,
        )
        return doc

    def _takeover(
        self, record: RolloutRecord, session: _Session, generation: int
    ) -> dict[str, Any]:
        """The command that begins this driving session: the log counts it (the session's
        level) and starts the step's clock again (its labels are counted afresh). Its id names
        this worker and counts its attempts: two drivers at once each take over, and the later
        one is stale; a resend is a new id (a refused copy's id stays in every table's seen
        ids: resent as is, it would be refused as a duplicate forever)."""
        tag = {
            "id": record.id,
            "step": record.step,
            "decision": "takeover",
            "reason": f"session {session.session}",
            "driver": self.worker,
            "restored": session.restored,
        }
        self._takeovers_sent += 1
        body = orjson.dumps(
            [
                record.id,
                record.step,
                "takeover",
                generation,
                self.worker,
                self._nonce,
                self._takeovers_sent,
            ]
        )
        command_id = f"rollout-{hashlib.sha256(body).hexdigest()[:32]}"
        return {
            "id": command_id,
            "command": "rollout",
            "model": record.model,
            "action": "takeover",
            "rollout": tag,
            "if_generation": generation,
        }

    def _command(
        self, record: RolloutRecord, session: _Session, action: Action, generation: int
    ) -> dict[str, Any]:
        kind = action.kind.value
        tag = {
            "id": record.id,
            "step": action.step,
            "decision": kind,
            "reason": action.reason,
            "evidence": session.evidence.snapshot(),
            "driver": self.worker,
            "restored": session.restored,
        }
        body: dict[str, Any]
        if action.kind is ActionKind.ADVANCE:
            weight = action.weight if action.weight is not None else 0.0
            weights = {record.candidate: weight}
            if weight < 1.0:
                weights[record.incumbent] = round(1.0 - weight, 12)
            body = {"command": "split", "model": record.model, "weights": weights}
        elif action.kind is ActionKind.PROMOTE:
            body = {"command": "swap", "model": record.model, "version": record.candidate}
        elif action.kind is ActionKind.ABORT:
            body = {"command": "swap", "model": record.model, "version": record.incumbent}
        else:  # HOLD
            body = {"command": "rollout", "model": record.model, "action": "hold"}
        command_id = rollout_command_id(record.id, action.step, kind, generation)
        return {"id": command_id, **body, "rollout": tag, "if_generation": generation}

    def _describe(self, record: RolloutRecord, session: _Session) -> dict[str, Any]:
        view = session.evidence.view()
        snap = session.evidence.snapshot()
        versions = {}
        for side, version in (("candidate", record.candidate), ("incumbent", record.incumbent)):
            part = snap[side]
            assert isinstance(part, dict)
            versions[version] = {k: part[k] for k in ("labels", "mean", "lower", "upper")}
            versions[version]["side"] = side
        last = session.last
        return {
            "id": record.id,
            "step": record.step,
            "weight": record.weight,
            "held": record.held,
            "metric": record.plan.metric,
            "margin": record.plan.margin,
            "evidence": {
                "versions": versions,
                "difference": {
                    "lower": _finite(view.lower),
                    "upper": _finite(view.upper),
                },
                "at_step": dict(session.at_step),
                "restored_from_log": session.restored,
                "session": session.session,
                "level": session_alpha(record.plan.alpha, session.session),
                "step_difference": _step_difference(session),
                "invalid_predictions": session.invalid,
                "dropped_labels": session.dropped,
            },
            "decision": None
            if last is None
            else {"kind": last.kind.value, "reason": last.reason, "at": session.last_at},
            "waiting_for": session.pending[0] if session.pending else None,
            # False until the log applied this session's takeover (it decides nothing before)
            "active": session.active,
            "yielding_until": session.yielding_until,
        }


def _latest_takeover(record: RolloutRecord) -> str | None:
    """The command id of the log's latest takeover of ``record`` (None: none yet)."""
    return next(
        (d["command_id"] for d in reversed(record.decisions) if d["decision"] == "takeover"),
        None,
    )


def step_alpha(alpha: float, step: int) -> float:
    """The level of step ``step``'s own sequences in a session at level ``alpha``: half of it
    shared among the steps as ``alpha / 2 * 6 / (pi^2 (step + 1)^2)`` (the other half is the
    whole rollout's).

    >>> round(step_alpha(0.05, 0), 5), round(sum(step_alpha(0.05, j) for j in range(10**5)), 5)
    (0.0152, 0.025)
    """
    return alpha / 2.0 * 6.0 / (math.pi**2 * (step + 1) ** 2)


def _step_difference(session: _Session) -> dict[str, float | None]:
    ev = session.step_evidence
    if ev is None:
        return {"lower": None, "upper": None}
    view = ev.view()
    return {"lower": _finite(view.lower), "upper": _finite(view.upper)}


def _worse_at_step(record: RolloutRecord, session: _Session) -> str | None:
    """Why the step's own labels say the candidate is worse by more than the margin (an
    abort), or None. At a weight-1 step the incumbent serves nothing: its whole-rollout
    sequence stands in for its step's."""
    ev = session.step_evidence
    if ev is None:
        return None
    plan, step = record.plan, record.plan.steps[record.step]
    view = ev.view()
    inc_upper = ev.sequence("incumbent").upper
    if step.weight == 1.0:
        inc_upper = min(inc_upper, session.evidence.sequence("incumbent").upper)
    elif view.n_incumbent < step.min_labels:
        return None
    if view.n_candidate < step.min_labels:
        return None
    lower = ev.sequence("candidate").lower - inc_upper
    if lower <= plan.margin:
        return None
    return (
        f"worse at step {record.step} on its own labels: difference >= {lower:.4g}, "
        f"margin {plan.margin:g}"
    )


def session_alpha(alpha: float, k: int) -> float:
    """The level of a rollout's ``k``-th driving session: ``alpha * 6 / (pi^2 k^2)``; summed
    over every session it is at most ``alpha`` (sum 1/k^2 = pi^2 / 6).

    >>> round(session_alpha(0.05, 1), 5), round(session_alpha(0.05, 2), 5)
    (0.0304, 0.0076)
    >>> round(sum(session_alpha(0.05, k) for k in range(1, 100_000)), 5)
    0.05
    """
    return alpha * 6.0 / (math.pi**2 * k * k)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def clock() -> float:
    """The driver's clock: seconds since the epoch (the step times in the log are too)."""
    return time.time()


Reader = Callable[[], tuple[int, Mapping[str, RolloutRecord]]]
"""Reads the routing table's generation and rollouts, consistently (see the runtime)."""
