"""The statistics of a label-driven progressive rollout: an anytime-valid gate and the step
machine that moves a candidate version through traffic weights on its evidence.

Pure: numpy and the standard library only. Time is passed in (``now_s``, any monotonic clock in
seconds), so the same labels in the same order and the same clock readings replay to the same
decisions.

The sequential test
-------------------
Each version's labelled events become losses bounded in ``[0, bound]``:

    ``log_loss``  ``-log(p)`` for label 1, ``-log(1 - p)`` for label 0, with ``p`` clipped to
                  ``[clip, 1 - clip]`` (default 1e-4), so ``bound = -log(clip)``.
    ``accuracy``  the 0/1 error ``(p > 0.5) != label`` (the threshold of ``Prequential`` and
                  ``error_of``), ``bound = 1``; the margin is in accuracy points.
    ``roc_auc``   AUC is not a mean over labels, so it is gated through a per-pair statistic:
                  each positive is paired with a negative of the *same* version, in arrival
                  order, every event in at most one pair, and the pair's loss is
                  ``1 - [s_pos > s_neg] - 0.5 [s_pos == s_neg]``, whose mean is ``1 - AUC``
                  (``bound = 1``). Which events pair depends on labels and arrival order only,
                  never on scores, so the pairs are independent draws. It uses about
                  ``min(positives, negatives)`` pairs: a weaker test than the U-statistic.

For each version, a confidence sequence (CS) for its mean loss: the predictable plug-in
empirical-Bernstein CS (PrPl-EB) of Waudby-Smith & Ramdas, "Estimating means of bounded random
variables by betting", JRSS-B 2023, Theorem 2 (the empirical-Bernstein line of Howard, Ramdas,
McAuliffe & Sekhon, "Time-uniform, nonparametric, nonasymptotic confidence sequences", Ann.
Statist. 2021). With ``x_i = loss_i / bound`` in ``[0, 1]``::

    mu_i     = (1/2 + sum_{j<=i} x_j) / (i + 1)
    sigma2_i = (1/4 + sum_{j<=i} (x_j - mu_j)^2) / (i + 1)
    lam_i    = min(sqrt(2 log(2/a) / (sigma2_{i-1} i log(1 + i))), 1/2)
    psi(lam) = -log(1 - lam) - lam
    C_t      = sum lam_i x_i / sum lam_i
               +- (log(2/a) + sum (x_i - mu_{i-1})^2 psi(lam_i)) / sum lam_i

``P(some t has mu outside C_t) <= a``, however often it is looked at (Ville's inequality on a
nonnegative supermartingale), with no distributional assumption beyond the bound; it adapts to
the losses' variance, so the clip of log loss costs little. If the mean drifts, ``C_t`` covers
the ``lam``-weighted average of the conditional means. Updates are O(1) and the state is six
numbers (:class:`SequenceState`), so a driver can checkpoint it.

Pairing. The two versions may see different events (a split) or the same (a shadow): the gate
does not pair them. Each version's CS runs at level ``alpha / 2``; by the union bound (no
independence needed) both cover at every label with probability ``>= 1 - alpha``, and then
``[L_cand - U_inc, U_cand - L_inc]`` covers ``mean_cand - mean_inc`` at every label. Verdicts,
once each version has ``min_labels``:

    PROMOTE   ``U_cand - L_inc < margin``  (not worse by more than ``margin``: non-inferiority)
    ABORT     ``L_cand - U_inc > margin``  (worse by more than ``margin``)
    CONTINUE  otherwise

So over a whole rollout, checked after every label and at every step, the probability of any
wrong verdict (promoting a candidate worse by ``>= margin``, or aborting one within it) is at
most ``alpha`` *if* each version's losses are draws with one mean for the whole rollout (a
stationary stream) and both versions are scored on populations alike. The driver
(:mod:`stream_infer.online.rollout`) adds what the level then covers: a version's failed
events count as its largest loss, and each driving session runs at its own share of ``alpha``.

The steps. One :class:`Evidence` runs for the whole rollout; each step only adds its own
``min_labels`` per version (labels of events its routing served) before the gate may pass or
fail it. Only the shadow step (weight 0) scores both versions on the same events: at a split
step each version is scored on its own keys (the split hashes keys), and a driver sees only the
keys of its own partitions, so a difference of populations reads as a difference of versions.
A later step's labels weigh little against many earlier ones (the bounds are over all of
them): the driver also runs an :class:`Evidence` per step, which aborts the step on its own
labels (:mod:`stream_infer.online.rollout`). At a
weight-1 step the incumbent serves nothing, so its ``min_labels`` is waived.
:func:`next_action` maps (plan, state, evidence, now) to stay / advance / hold / promote (swap)
/ abort (back to the incumbent).

>>> rng = np.random.default_rng(7)
>>> ev = Evidence("accuracy", alpha=0.05)
>>> ev.add_many("incumbent", rng.random(4000) < 0.5, np.full(4000, 0.9))  # 50 % errors
>>> ev.add_many("candidate", rng.random(4000) < 0.9, np.full(4000, 0.9))  # 10 % errors
>>> view = ev.view()
>>> view.n_candidate, view.upper < -0.3 < view.lower + 0.2
(4000, True)
>>> verdict(view, margin=0.02, min_labels=100)
<Verdict.PROMOTE: 'promote'>
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt

Metric = Literal["log_loss", "accuracy", "roc_auc"]
Side = Literal["candidate", "incumbent"]
OnTimeout = Literal["hold", "abort"]
FloatArray = npt.NDArray[np.float64]

_LAMBDA_MAX = 0.5  # the truncation c of PrPl-EB's lam_i (Waudby-Smith & Ramdas suggest 1/2)


def _running(start: FloatArray | float, values: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Sums along the last axis from ``start``: (after each value, before each value). Summed
    one value at a time from ``start``, so a batch and one value at a time agree bit for bit."""
    first = np.broadcast_to(np.asarray(start, dtype=np.float64), values.shape[:-1])[..., None]
    sums = np.cumsum(np.concatenate([first, values], axis=-1), axis=-1)
    return sums[..., 1:], sums[..., :-1]


@dataclass(frozen=True)
class SequenceState:
    """The sums a :class:`ConfidenceSequence` carries (losses scaled to ``[0, 1]``)."""

    n: int = 0
    sum_x: float = 0.0  # sum x_i
    sum_dev2: float = 0.0  # sum (x_i - mu_i)^2
    sum_lam: float = 0.0  # sum lam_i
    sum_lam_x: float = 0.0  # sum lam_i x_i
    sum_penalty: float = 0.0  # sum (x_i - mu_{i-1})^2 psi(lam_i)


def _advance(
    values: FloatArray, alpha: float, bound: float, state: SequenceState
) -> tuple[FloatArray, FloatArray, SequenceState]:
    """PrPl-EB over the last axis of ``values`` from ``state``: the (lower, upper) bounds after
    each value, and the state after the last (meaningful for 1-D input)."""
    x = np.asarray(values, dtype=np.float64) / bound
    t = state.n + np.arange(1, x.shape[-1] + 1, dtype=np.float64)
    log_term = math.log(2.0 / alpha)
    s_after, s_before = _running(state.sum_x, x)
    mu_after, mu_before = (0.5 + s_after) / (t + 1.0), (0.5 + s_before) / t
    d_after, d_before = _running(state.sum_dev2, (x - mu_after) ** 2)
    sigma2_before = (0.25 + d_before) / t
    lam = np.minimum(np.sqrt(2.0 * log_term / (sigma2_before * t * np.log1p(t))), _LAMBDA_MAX)
    penalty = (x - mu_before) ** 2 * (-np.log1p(-lam) - lam)
    lam_sum, _ = _running(state.sum_lam, lam)
    lam_x_sum, _ = _running(state.sum_lam_x, lam * x)
    pen_sum, _ = _running(state.sum_penalty, penalty)
    centre, half = lam_x_sum / lam_sum, (log_term + pen_sum) / lam_sum
    lower = np.maximum(centre - half, 0.0) * bound
    upper = np.minimum(centre + half, 1.0) * bound
    if x.ndim != 1 or x.shape[0] == 0:
        return lower, upper, state
    after = SequenceState(
        n=state.n + x.shape[0],
        sum_x=float(s_after[-1]),
        sum_dev2=float(d_after[-1]),
        sum_lam=float(lam_sum[-1]),
        sum_lam_x=float(lam_x_sum[-1]),
        sum_penalty=float(pen_sum[-1]),
    )
    return lower, upper, after


def _check_level(alpha: float, bound: float, where: str) -> None:
    if not 0.0 < alpha < 1.0:
        msg = f"{where}: alpha must be in (0, 1), got {alpha!r}"
        raise ValueError(msg)
    if not (math.isfinite(bound) and bound > 0.0):
        msg = f"{where}: bound must be a finite number > 0, got {bound!r}"
        raise ValueError(msg)


def confidence_bounds(
    values: npt.ArrayLike, alpha: float, bound: float = 1.0
) -> tuple[FloatArray, FloatArray]:
    """The PrPl-EB confidence sequence of a fresh stream of values in ``[0, bound]``, along the
    last axis (one row per simulated stream): the (lower, upper) bounds after each value.

    >>> lower, upper = confidence_bounds([0.0, 1.0] * 500, alpha=0.05)
    >>> bool(lower[-1] < 0.5 < upper[-1]), bool(upper[-1] - lower[-1] < upper[9] - lower[9])
    (True, True)
    """
    _check_level(alpha, bound, "confidence_bounds")
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 0 or not np.all((x >= 0.0) & (x <= bound)):
        msg = f"confidence_bounds: values must be an array in [0, {bound}]"
        raise ValueError(msg)
    lower, upper, _ = _advance(x, alpha, bound, SequenceState())
    return lower, upper


class ConfidenceSequence:
    """The PrPl-EB confidence sequence for the mean of a stream of values in ``[0, bound]``,
    valid at level ``alpha`` at every ``n`` at once.

    >>> cs = ConfidenceSequence(alpha=0.05, bound=1.0)
    >>> cs.lower, cs.upper
    (0.0, 1.0)
    >>> cs.update_many([0.0, 1.0] * 200)
    >>> cs.n, round(cs.mean, 3), cs.lower < 0.5 < cs.upper
    (400, 0.5, True)
    >>> again = ConfidenceSequence(0.05, 1.0, state=cs.state)  # a checkpoint restores exactly
    >>> (again.lower, again.upper) == (cs.lower, cs.upper)
    True
    """

    def __init__(self, alpha: float, bound: float = 1.0, state: SequenceState | None = None):
        _check_level(alpha, bound, "ConfidenceSequence")
        self.alpha = alpha
        self.bound = bound
        self._state = state or SequenceState()
        self._lower, self._upper = 0.0, bound
        if self._state.n:
            log_term = math.log(2.0 / alpha)
            s = self._state
            centre, half = s.sum_lam_x / s.sum_lam, (log_term + s.sum_penalty) / s.sum_lam
            self._lower = max(centre - half, 0.0) * bound
            self._upper = min(centre + half, 1.0) * bound

    @property
    def state(self) -> SequenceState:
        """The sums to checkpoint; ``ConfidenceSequence(alpha, bound, state)`` resumes."""
        return self._state

    @property
    def n(self) -> int:
        """The number of values seen."""
        return self._state.n

    @property
    def mean(self) -> float:
        """The plain mean of the values seen (NaN before the first)."""
        return self._state.sum_x / self._state.n * self.bound if self._state.n else math.nan

    @property
    def lower(self) -> float:
        """The lower bound on the mean after the values seen."""
        return self._lower

    @property
    def upper(self) -> float:
        """The upper bound on the mean after the values seen."""
        return self._upper

    def update_one(self, value: float) -> None:
        """Add one value."""
        self.update_many([value])

    def update_many(self, values: npt.ArrayLike) -> None:
        """Add values in order; the same as adding them one at a time."""
        x = np.asarray(values, dtype=np.float64).reshape(-1)
        if not np.all((x >= 0.0) & (x <= self.bound)):  # also rejects NaN
            msg = f"ConfidenceSequence.update_many: values must be in [0, {self.bound}]"
            raise ValueError(msg)
        if x.size == 0:
            return
        lower, upper, self._state = _advance(x, self.alpha, self.bound, self._state)
        self._lower, self._upper = float(lower[-1]), float(upper[-1])


def loss_bound(metric: Metric, clip: float = 1e-4) -> float:
    """The largest loss ``metric`` gives: ``-log(clip)`` for log loss, 1 otherwise.

    >>> round(loss_bound("log_loss"), 3), loss_bound("accuracy")
    (9.21, 1.0)
    """
    if metric not in get_args(Metric):
        msg = f"loss_bound: metric must be one of {get_args(Metric)}, got {metric!r}"
        raise ValueError(msg)
    if not 0.0 < clip < 0.5:
        msg = f"loss_bound: clip must be in (0, 0.5), got {clip!r}"
        raise ValueError(msg)
    return -math.log(clip) if metric == "log_loss" else 1.0


def _labels_and_probas(
    labels: npt.ArrayLike, probas: npt.ArrayLike, where: str
) -> tuple[npt.NDArray[np.bool_], FloatArray]:
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probas, dtype=np.float64)
    if y.shape != p.shape:
        msg = f"{where}: labels {y.shape} and probabilities {p.shape} differ in shape"
        raise ValueError(msg)
    if not np.all((y == 0.0) | (y == 1.0)):
        msg = f"{where}: a classification label is 0/1"
        raise ValueError(msg)
    if not np.all((p >= 0.0) & (p <= 1.0)):  # also rejects NaN
        msg = f"{where}: a prediction is a probability in [0, 1]"
        raise ValueError(msg)
    return y == 1.0, p


def losses_many(
    metric: Literal["log_loss", "accuracy"],
    labels: npt.ArrayLike,
    probas: npt.ArrayLike,
    clip: float = 1e-4,
) -> FloatArray:
    """The per-label losses of a version's predictions ``P(label = 1)``.

    >>> losses_many("accuracy", [1, 0, 1], [0.9, 0.6, 0.5]).tolist()
    [0.0, 1.0, 1.0]
    >>> losses_many("log_loss", [1, 0], [0.9, 0.0]).round(3).tolist()
    [0.105, 0.0]
    """
    loss_bound(metric, clip)
    if metric not in ("log_loss", "accuracy"):
        msg = f"losses_many: {metric} has no per-label loss (Evidence pairs roc_auc's events)"
        raise ValueError(msg)
    y, p = _labels_and_probas(labels, probas, "losses_many")
    if metric == "accuracy":
        errors: FloatArray = ((p > 0.5) != y).astype(np.float64)
        return errors
    q = np.clip(p, clip, 1.0 - clip)
    # 1 - (1 - clip) rounds to a little under clip: keep the loss within its bound
    losses: FloatArray = np.minimum(-np.log(np.where(y, q, 1.0 - q)), -math.log(clip))
    return losses


class AucPairs:
    """Turns one version's (label, score) stream into per-pair AUC losses: each positive meets
    the oldest waiting negative (or the reverse), every event in at most one pair. At most
    ``max_waiting`` events of each class wait; beyond that the oldest is dropped (by arrival
    order, never by score).

    >>> pairs = AucPairs()
    >>> pairs.add_many([1, 1, 0, 0, 0], [0.9, 0.4, 0.2, 0.4, 0.8]).tolist()
    [0.0, 0.5]
    """

    def __init__(self, max_waiting: int = 1000) -> None:
        if max_waiting < 1:
            msg = f"AucPairs: max_waiting must be >= 1, got {max_waiting!r}"
            raise ValueError(msg)
        self.max_waiting = max_waiting
        self._waiting: dict[bool, deque[float]] = {
            True: deque(maxlen=max_waiting),
            False: deque(maxlen=max_waiting),
        }

    def add_many(self, labels: npt.ArrayLike, scores: npt.ArrayLike) -> FloatArray:
        """The losses of the pairs these events complete, in order."""
        y, p = _labels_and_probas(labels, scores, "AucPairs.add_many")
        out: list[float] = []
        for positive, score in zip(y.tolist(), p.tolist(), strict=True):
            other = self._waiting[not positive]
            if not other:
                self._waiting[positive].append(score)
                continue
            pos, neg = (score, other.popleft()) if positive else (other.popleft(), score)
            out.append(0.0 if pos > neg else 0.5 if pos == neg else 1.0)
        return np.asarray(out, dtype=np.float64)


@dataclass(frozen=True)
class EvidenceView:
    """What the gate reads: labels per version, and the bounds on
    ``mean loss(candidate) - mean loss(incumbent)`` (valid at every label at once)."""

    n_candidate: int
    n_incumbent: int
    lower: float
    upper: float


class Evidence:
    """The evidence of one rollout: a :class:`ConfidenceSequence` per version at
    ``alpha / 2`` each, fed with labelled predictions.

    ``n_candidate`` / ``n_incumbent`` count labels (for ``roc_auc`` the sequences count pairs).
    """

    def __init__(self, metric: Metric, alpha: float = 0.05, clip: float = 1e-4) -> None:
        self.metric = metric
        self.alpha = alpha
        self.clip = clip
        self.bound = loss_bound(metric, clip)
        _check_level(alpha, self.bound, "Evidence")
        self._sequences = {
            side: ConfidenceSequence(alpha / 2.0, self.bound) for side in get_args(Side)
        }
        self._pairs = {side: AucPairs() for side in get_args(Side)}
        self._labels = dict.fromkeys(get_args(Side), 0)

    def sequence(self, side: Side) -> ConfidenceSequence:
        """The confidence sequence of one version's mean loss."""
        return self._sequences[side]

    def add_one(self, side: Side, label: float, proba: float) -> None:
        """Add one labelled prediction of ``side``."""
        self.add_many(side, [label], [proba])

    def add_many(self, side: Side, labels: npt.ArrayLike, probas: npt.ArrayLike) -> None:
        """Add labelled predictions of ``side``, in arrival order."""
        if side not in self._sequences:
            msg = f"Evidence.add_many: side must be one of {get_args(Side)}, got {side!r}"
            raise ValueError(msg)
        metric = self.metric
        if metric == "roc_auc":
            losses = self._pairs[side].add_many(labels, probas)
        else:
            losses = losses_many(metric, labels, probas, self.clip)
        self._sequences[side].update_many(losses)
        self._labels[side] += int(np.asarray(labels).size)

    def snapshot(self) -> dict[str, object]:
        """What a step command carries: per version the labels, the mean loss, its bounds and
        the sequence's six sums, so a driver that takes over resumes the same confidence
        sequences (:meth:`restored`). AUC pairs still waiting for a partner are not carried.

        >>> ev = Evidence("accuracy")
        >>> ev.add_many("candidate", [1, 0, 1], [0.9, 0.2, 0.3])
        >>> again = Evidence.restored("accuracy", 0.05, ev.snapshot())
        >>> again.view() == ev.view(), again.view().n_candidate
        (True, 3)
        """
        out: dict[str, object] = {}
        for side in get_args(Side):
            cs = self._sequences[side]
            s = cs.state
            out[side] = {
                "labels": self._labels[side],
                "n": s.n,
                "mean": None if not s.n else cs.mean,
                "lower": cs.lower,
                "upper": cs.upper,
                "state": [s.n, s.sum_x, s.sum_dev2, s.sum_lam, s.sum_lam_x, s.sum_penalty],
            }
        view = self.view()
        out["difference"] = {"lower": view.lower, "upper": view.upper}
        return out

    @classmethod
    def restored(
        cls, metric: Metric, alpha: float, snapshot: Mapping[str, Any], clip: float = 1e-4
    ) -> Evidence:
        """The evidence a :meth:`snapshot` describes; ValueError if it is not one."""
        ev = cls(metric, alpha, clip)
        for side in get_args(Side):
            part = snapshot.get(side)
            if not isinstance(part, Mapping):
                msg = f"Evidence.restored: no {side!r} in the snapshot"
                raise ValueError(msg)
            raw_state, labels = part.get("state"), part.get("labels")
            if (
                not isinstance(raw_state, list)
                or len(raw_state) != 6
                or not all(type(v) in (int, float) and math.isfinite(v) for v in raw_state)
                or type(labels) is not int
                or labels < 0
                or raw_state[0] < 0
            ):
                msg = f"Evidence.restored: the {side!r} state is malformed"
                raise ValueError(msg)
            n = int(raw_state[0])
            if n and raw_state[3] <= 0:
                msg = f"Evidence.restored: the {side!r} state is malformed"
                raise ValueError(msg)
            state = SequenceState(n, *(float(v) for v in raw_state[1:]))
            ev._sequences[side] = ConfidenceSequence(alpha / 2.0, ev.bound, state=state)
            ev._labels[side] = labels
        return ev

    def view(self) -> EvidenceView:
        """The counts and the bounds on the difference, now."""
        cand, inc = self._sequences["candidate"], self._sequences["incumbent"]
        return EvidenceView(
            n_candidate=self._labels["candidate"],
            n_incumbent=self._labels["incumbent"],
            lower=cand.lower - inc.upper,
            upper=cand.upper - inc.lower,
        )


class Verdict(StrEnum):
    """What the evidence says about the candidate."""

    PROMOTE = "promote"
    ABORT = "abort"
    CONTINUE = "continue"


def verdict(view: EvidenceView, margin: float, min_labels: int) -> Verdict:
    """The gate: PROMOTE if ``upper < margin``, ABORT if ``lower > margin``, once both versions
    have ``min_labels`` labels in ``view``; else CONTINUE.

    >>> verdict(EvidenceView(500, 500, -0.1, 0.01), margin=0.02, min_labels=100)
    <Verdict.PROMOTE: 'promote'>
    >>> verdict(EvidenceView(50, 500, 0.05, 0.3), margin=0.02, min_labels=100)
    <Verdict.CONTINUE: 'continue'>
    """
    if min(view.n_candidate, view.n_incumbent) < min_labels:
        return Verdict.CONTINUE
    if view.upper < margin:
        return Verdict.PROMOTE
    if view.lower > margin:
        return Verdict.ABORT
    return Verdict.CONTINUE


@dataclass(frozen=True)
class RolloutStep:
    """One weight step: the candidate's traffic share (0 = shadow), the labels each version
    needs at this step (at weight 1 the incumbent serves nothing, so only the candidate's
    count), and what happens when ``max_duration_s`` runs out undecided."""

    weight: float
    min_labels: int = 500
    max_duration_s: float = 3600.0
    on_timeout: OnTimeout = "hold"

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            msg = f"RolloutStep: weight must be in [0, 1], got {self.weight!r}"
            raise ValueError(msg)
        if isinstance(self.min_labels, bool) or self.min_labels < 1:
            msg = f"RolloutStep: min_labels must be an int >= 1, got {self.min_labels!r}"
            raise ValueError(msg)
        if not self.max_duration_s > 0.0:
            msg = f"RolloutStep: max_duration_s must be > 0, got {self.max_duration_s!r}"
            raise ValueError(msg)
        if self.on_timeout not in get_args(OnTimeout):
            msg = f"RolloutStep: on_timeout must be 'hold' or 'abort', got {self.on_timeout!r}"
            raise ValueError(msg)


@dataclass(frozen=True)
class RolloutPlan:
    """Weight steps in increasing order, and the gate: ``metric``, ``margin`` (in the metric's
    loss units: log loss, accuracy points or AUC points), ``alpha``.

    >>> plan = RolloutPlan.of([0.0, 0.05, 0.25, 0.5, 1.0], min_labels=200, max_duration_s=600)
    >>> [s.weight for s in plan.steps], plan.metric
    ([0.0, 0.05, 0.25, 0.5, 1.0], 'log_loss')
    """

    steps: tuple[RolloutStep, ...]
    metric: Metric = "log_loss"
    margin: float = 0.0
    alpha: float = 0.05
    clip: float = 1e-4

    def __post_init__(self) -> None:
        if not self.steps:
            msg = "RolloutPlan: steps must not be empty"
            raise ValueError(msg)
        weights = [s.weight for s in self.steps]
        if any(b <= a for a, b in itertools.pairwise(weights)):
            msg = f"RolloutPlan: step weights must increase, got {weights}"
            raise ValueError(msg)
        if not (math.isfinite(self.margin) and self.margin >= 0.0):
            msg = f"RolloutPlan: margin must be a finite number >= 0, got {self.margin!r}"
            raise ValueError(msg)
        _check_level(self.alpha, loss_bound(self.metric, self.clip), "RolloutPlan")

    @classmethod
    def of(
        cls,
        weights: list[float],
        *,
        min_labels: int = 500,
        max_duration_s: float = 3600.0,
        on_timeout: OnTimeout = "hold",
        metric: Metric = "log_loss",
        margin: float = 0.0,
        alpha: float = 0.05,
    ) -> RolloutPlan:
        """A plan whose steps share ``min_labels``, ``max_duration_s`` and ``on_timeout``."""
        steps = tuple(RolloutStep(w, min_labels, max_duration_s, on_timeout) for w in weights)
        return cls(steps, metric=metric, margin=margin, alpha=alpha)

    def evidence(self) -> Evidence:
        """A fresh :class:`Evidence` for this plan's metric and alpha."""
        return Evidence(self.metric, self.alpha, self.clip)


@dataclass(frozen=True)
class RolloutState:
    """Where a rollout is: its step, when the step began, the labels counted before it, and
    whether it is held (timed out on ``hold``) or finished."""

    step: int
    step_started_s: float
    n_candidate_before: int = 0
    n_incumbent_before: int = 0
    held: bool = False
    outcome: Literal["running", "promoted", "aborted"] = "running"

    @classmethod
    def begin(cls, now_s: float, view: EvidenceView | None = None) -> RolloutState:
        """The state of a rollout that starts at step 0 at ``now_s``."""
        n_c, n_i = (view.n_candidate, view.n_incumbent) if view else (0, 0)
        return cls(0, now_s, n_c, n_i)


class ActionKind(StrEnum):
    """What the driver does next."""

    STAY = "stay"  # keep the current weight
    ADVANCE = "advance"  # route ``weight`` to the candidate (the next step)
    HOLD = "hold"  # the step timed out on "hold": stay at this weight until resumed
    PROMOTE = "promote"  # swap: the candidate becomes the serving version
    ABORT = "abort"  # back to the incumbent's routing: the candidate gets no traffic


@dataclass(frozen=True)
class Action:
    """One decision: what to do, the step and candidate weight after it (``None`` after an
    abort), why, and the evidence it read."""

    kind: ActionKind
    step: int
    weight: float | None
    reason: str
    evidence: EvidenceView


def next_action(
    plan: RolloutPlan, state: RolloutState, view: EvidenceView, now_s: float
) -> tuple[Action, RolloutState]:
    """The next action of a rollout and the state after it. Pure: the same inputs give the same
    output. The gate reads ``view`` (the whole rollout's evidence, valid at every look) with
    the labels counted since the current step began.

    >>> plan = RolloutPlan.of([0.0, 1.0], min_labels=100, max_duration_s=60, margin=0.02)
    >>> state = RolloutState.begin(now_s=0.0)
    >>> action, state = next_action(plan, state, EvidenceView(40, 40, -1.0, 1.0), now_s=10.0)
    >>> action.kind, action.reason
    (<ActionKind.STAY: 'stay'>, 'waiting for labels: candidate 40/100, incumbent 40/100')
    >>> action, state = next_action(plan, state, EvidenceView(150, 150, -0.2, 0.01), 20.0)
    >>> action.kind, action.weight
    (<ActionKind.ADVANCE: 'advance'>, 1.0)
    >>> action, state = next_action(plan, state, EvidenceView(200, 200, -0.2, 0.0), 30.0)
    >>> action.kind, state.outcome  # only 50 labels each at this step
    (<ActionKind.STAY: 'stay'>, 'running')
    >>> next_action(plan, state, EvidenceView(300, 300, -0.2, 0.0), 40.0)[0].kind
    <ActionKind.PROMOTE: 'promote'>
    """
    step = plan.steps[state.step]

    def act(kind: ActionKind, reason: str, after: RolloutState) -> tuple[Action, RolloutState]:
        if after.outcome == "aborted":
            weight: float | None = None
        elif after.outcome == "promoted":
            weight = 1.0
        else:
            weight = plan.steps[after.step].weight
        return Action(kind, after.step, weight, reason, view), after

    if state.outcome != "running":
        return act(ActionKind.STAY, f"finished: {state.outcome}", state)
    at_step = replace(
        view,
        n_candidate=view.n_candidate - state.n_candidate_before,
        n_incumbent=view.n_incumbent - state.n_incumbent_before,
    )
    if step.weight == 1.0:  # the incumbent serves nothing at this step: only the candidate counts
        at_step = replace(at_step, n_incumbent=step.min_labels)
    gate = verdict(at_step, plan.margin, step.min_labels)
    bounds = f"difference in [{view.lower:.4g}, {view.upper:.4g}], margin {plan.margin:g}"
    if gate is Verdict.ABORT:
        return act(ActionKind.ABORT, f"worse: {bounds}", replace(state, outcome="aborted"))
    if state.held:
        return act(ActionKind.STAY, f"held at step {state.step}: {bounds}", state)
    if gate is Verdict.PROMOTE:
        if state.step + 1 == len(plan.steps):
            return act(
                ActionKind.PROMOTE, f"not worse: {bounds}", replace(state, outcome="promoted")
            )
        after = RolloutState(state.step + 1, now_s, view.n_candidate, view.n_incumbent)
        return act(ActionKind.ADVANCE, f"not worse: {bounds}", after)
    if now_s - state.step_started_s >= step.max_duration_s:
        if step.on_timeout == "abort":
            reason = f"step {state.step} timed out after {step.max_duration_s:g} s: {bounds}"
            return act(ActionKind.ABORT, reason, replace(state, outcome="aborted"))
        reason = f"step {state.step} timed out after {step.max_duration_s:g} s, held: {bounds}"
        return act(ActionKind.HOLD, reason, replace(state, held=True))
    if min(at_step.n_candidate, at_step.n_incumbent) < step.min_labels:
        reason = (
            f"waiting for labels: candidate {at_step.n_candidate}/{step.min_labels}, "
            f"incumbent {at_step.n_incumbent}/{step.min_labels}"
        )
        return act(ActionKind.STAY, reason, state)
    return act(ActionKind.STAY, f"undecided: {bounds}", state)


def resume(state: RolloutState, now_s: float) -> RolloutState:
    """A held rollout resumed by an operator: the current step's clock starts again at
    ``now_s``; the labels it has already seen still count."""
    if state.outcome != "running":
        msg = f"resume: the rollout is finished ({state.outcome})"
        raise ValueError(msg)
    return replace(state, step_started_s=now_s, held=False)
