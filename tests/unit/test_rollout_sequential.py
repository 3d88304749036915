"""The rollout gate's sequential test (PrPl-EB confidence sequences) and the step machine.

The simulations check the gate after every label of a merged label stream, as a driver would.
They use the module's vectorised building blocks (``losses_many``, ``confidence_bounds``), which
``test_evidence_is_the_vectorised_path`` shows give the same bounds as ``Evidence`` fed one
label at a time. Seeds are fixed, so the rates printed (``pytest -s``) are reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
import pytest

from stream_infer.core.rollout import (
    ActionKind,
    AucPairs,
    ConfidenceSequence,
    Evidence,
    EvidenceView,
    RolloutPlan,
    RolloutState,
    RolloutStep,
    Verdict,
    confidence_bounds,
    loss_bound,
    losses_many,
    next_action,
    resume,
    verdict,
)

ALPHA = 0.05
MARGIN = 0.02
MIN_LABELS = 50
Z_ONE_SIDED = 1.6448536269514722  # the 95 % quantile of N(0, 1)

Floats = npt.NDArray[np.float64]


@dataclass
class Runs:
    """Per simulated run: the merged label index (1-based) of the first PROMOTE / ABORT, or 0."""

    promote_at: npt.NDArray[np.int64]
    abort_at: npt.NDArray[np.int64]
    peeked_promote_at: npt.NDArray[np.int64]

    def rate(self, which: npt.NDArray[np.int64]) -> float:
        return float(np.mean(which > 0))


def _first(hit: npt.NDArray[np.bool_]) -> npt.NDArray[np.int64]:
    return np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, 0).astype(np.int64)


def simulate(cand: Floats, inc: Floats, to_candidate: npt.NDArray[np.bool_], bound: float) -> Runs:
    """Merge each run's two loss streams (``to_candidate`` says whose label comes next) and
    check the gate after every merged label: the sequential gate, and a fixed-horizon one-sided
    z-test (Welch) peeked at the same times."""
    lower_c, upper_c = confidence_bounds(cand, ALPHA / 2, bound)
    lower_i, upper_i = confidence_bounds(inc, ALPHA / 2, bound)
    n_c: npt.NDArray[np.int64] = np.cumsum(to_candidate, axis=1, dtype=np.int64)
    n_i = np.arange(1, to_candidate.shape[1] + 1) - n_c
    ready = (n_c >= MIN_LABELS) & (n_i >= MIN_LABELS)
    at_c, at_i = np.maximum(n_c - 1, 0), np.maximum(n_i - 1, 0)

    def at(path: Floats, idx: npt.NDArray[np.int64]) -> Floats:
        return np.take_along_axis(path, idx, axis=1)

    upper = at(upper_c, at_c) - at(lower_i, at_i)
    lower = at(lower_c, at_c) - at(upper_i, at_i)

    def mean_var(x: Floats, idx: npt.NDArray[np.int64], n: npt.NDArray[np.int64]) -> Floats:
        m = at(np.cumsum(x, axis=1), idx) / np.maximum(n, 1)
        m2 = at(np.cumsum(x * x, axis=1), idx) / np.maximum(n, 1)
        return np.stack([m, np.maximum(m2 - m * m, 1e-12) / np.maximum(n, 1)])

    (m_c, v_c), (m_i, v_i) = mean_var(cand, at_c, n_c), mean_var(inc, at_i, n_i)
    peeked_upper = m_c - m_i + Z_ONE_SIDED * np.sqrt(v_c + v_i)
    return Runs(
        promote_at=_first(ready & (upper < MARGIN)),
        abort_at=_first(ready & (lower > MARGIN)),
        peeked_promote_at=_first(ready & (peeked_upper < MARGIN)),
    )


def bernoulli_errors(rng: np.random.Generator, runs: int, n: int, error: float) -> Floats:
    return (rng.random((runs, n)) < error).astype(np.float64)


def two_point_log_loss(rng: np.random.Generator, runs: int, n: int, p: float) -> Floats:
    """Log losses of a version that always predicts ``p`` for labels that are 1 w.p. 0.7."""
    labels = rng.random((runs, n)) < 0.7
    return losses_many("log_loss", labels, np.full(labels.shape, p))


def expected_log_loss(p: float, q: float = 0.7) -> float:
    return -(q * math.log(p) + (1 - q) * math.log(1 - p))


def predicting_worse_by(extra: float, q: float = 0.7) -> float:
    """The constant prediction below q whose expected log loss is H(q) + extra (bisection)."""
    lo, hi = 0.01, q
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (
            (mid, hi) if expected_log_loss(mid, q) > expected_log_loss(q, q) + extra else (lo, mid)
        )
    return (lo + hi) / 2


def in_chunks(make: Callable[[int], Runs], runs: int, chunk: int = 250) -> Runs:
    """``runs`` simulated runs, ``chunk`` at a time (bounded memory)."""
    parts = [make(chunk) for _ in range(runs // chunk)]
    return Runs(
        *(np.concatenate([getattr(p, f) for p in parts]) for f in Runs.__dataclass_fields__)
    )


# (a) the null boundary: the candidate worse by exactly the margin


@pytest.mark.parametrize("metric", ["accuracy", "log_loss"])
def test_false_promotion_at_the_margin_stays_under_alpha_checked_after_every_label(
    metric: str,
) -> None:
    rng = np.random.default_rng(17)
    n = 4000  # merged labels per run, half to each version on average
    bound = loss_bound("accuracy" if metric == "accuracy" else "log_loss")
    p_worse = predicting_worse_by(MARGIN)
    assert expected_log_loss(p_worse) - expected_log_loss(0.7) == pytest.approx(MARGIN)

    def one_chunk(runs: int) -> Runs:
        if metric == "accuracy":
            cand = bernoulli_errors(rng, runs, n, 0.20 + MARGIN)
            inc = bernoulli_errors(rng, runs, n, 0.20)
        else:
            cand = two_point_log_loss(rng, runs, n, p_worse)
            inc = two_point_log_loss(rng, runs, n, 0.7)
        return simulate(cand, inc, rng.random((runs, n)) < 0.5, bound)

    runs = in_chunks(one_chunk, 1000)
    sequential, peeked = runs.rate(runs.promote_at), runs.rate(runs.peeked_promote_at)
    print(
        f"\n{metric}: false promotion, 1000 runs x {n} labels, checked after every label: "
        f"sequential {sequential:.3f}, fixed-horizon z-test peeked {peeked:.3f} (alpha {ALPHA})"
    )
    assert sequential <= ALPHA
    assert peeked > 2 * ALPHA  # the naive test fails this check: the gate is not vacuous
    assert runs.rate(runs.abort_at) <= ALPHA  # at the boundary, aborting is also an error


# (b) a clearly better candidate is promoted, (c) a clearly worse one aborted


@pytest.mark.parametrize(
    ("metric", "cand", "inc", "seed", "decided"),
    [
        ("accuracy", 0.12, 0.20, 18, "promote"),
        ("log_loss", 0.7, 0.55, 18, "promote"),
        ("accuracy", 0.32, 0.20, 19, "abort"),
        ("log_loss", 0.45, 0.7, 19, "abort"),
    ],
)
def test_a_clearly_better_candidate_is_promoted_and_a_clearly_worse_one_aborted(
    metric: str, cand: float, inc: float, seed: int, decided: str
) -> None:
    rng = np.random.default_rng(seed)
    n, runs = 12000, 100
    if metric == "accuracy":
        c, i = bernoulli_errors(rng, runs, n, cand), bernoulli_errors(rng, runs, n, inc)
    else:
        c, i = two_point_log_loss(rng, runs, n, cand), two_point_log_loss(rng, runs, n, inc)
    result = simulate(c, i, rng.random((runs, n)) < 0.5, loss_bound(metric))  # type: ignore[arg-type]
    wanted, other = (
        (result.promote_at, result.abort_at)
        if decided == "promote"
        else (result.abort_at, result.promote_at)
    )
    median = int(np.median(wanted))
    print(
        f"\n{metric}: candidate ({decided}) decided in {result.rate(wanted):.0%} of {runs} runs, "
        f"median {median} labels (both versions together)"
    )
    assert result.rate(wanted) == 1.0
    assert result.rate(other) == 0.0
    assert median < n / 2


def test_evidence_is_the_vectorised_path() -> None:
    """Evidence fed one label at a time gives the bounds the simulations compute in bulk, and
    a batch gives the same state as one value at a time."""
    rng = np.random.default_rng(20)
    labels = rng.random(300) < 0.7
    probas = np.clip(rng.normal(0.65, 0.2, 300), 0.0, 1.0)
    ev = Evidence("log_loss", alpha=ALPHA)
    for y, p in zip(labels.tolist(), probas.tolist(), strict=True):
        ev.add_one("candidate", float(y), p)
    lower, upper = confidence_bounds(losses_many("log_loss", labels, probas), ALPHA / 2, ev.bound)
    cs = ev.sequence("candidate")
    assert (cs.lower, cs.upper) == pytest.approx((lower[-1], upper[-1]), rel=1e-12)
    bulk = ConfidenceSequence(ALPHA / 2, ev.bound)
    bulk.update_many(losses_many("log_loss", labels, probas))
    assert bulk.state == cs.state
    view = ev.view()
    assert (view.n_candidate, view.n_incumbent) == (300, 0)
    assert (view.lower, view.upper) == (cs.lower - ev.bound, cs.upper - 0.0)


def test_the_confidence_sequence_covers_the_mean_at_every_n() -> None:
    """Coverage of one CS, at every n of 2000, over 400 runs of skewed bounded values."""
    rng = np.random.default_rng(21)
    x = rng.beta(0.5, 4.0, size=(400, 2000))  # mean 1/9, skewed
    lower, upper = confidence_bounds(x, 0.1)
    missed = np.any((lower > 1 / 9) | (upper < 1 / 9), axis=1).mean()
    print(f"\nCS at alpha 0.1 missed the mean somewhere in 2000 values in {missed:.3f} of runs")
    assert missed <= 0.1
    assert upper[:, -1].mean() - lower[:, -1].mean() < 0.05  # and it does narrow


def test_auc_pairs_estimate_one_minus_auc() -> None:
    rng = np.random.default_rng(22)
    labels = rng.random(20000) < 0.3
    scores = 1 / (1 + np.exp(-(rng.normal(size=20000) + 1.5 * labels)))  # AUC = Phi(1.5/sqrt 2)
    losses = AucPairs().add_many(labels, scores)
    auc = 0.5 * (1 + math.erf(1.5 / 2))
    assert len(losses) == pytest.approx(6000, rel=0.05)
    assert 1 - losses.mean() == pytest.approx(auc, abs=0.02)
    ev = Evidence("roc_auc")
    ev.add_many("incumbent", labels, scores)
    assert ev.view().n_incumbent == 20000
    assert ev.sequence("incumbent").n == len(losses)


def test_auc_pairs_keep_at_most_max_waiting() -> None:
    pairs = AucPairs(max_waiting=2)
    assert pairs.add_many([0, 0, 0], [0.1, 0.2, 0.3]).tolist() == []
    assert pairs.add_many([1, 1, 1], [0.25, 0.25, 0.25]).tolist() == [0.0, 1.0]  # 0.1 dropped


@pytest.mark.parametrize(
    "call",
    [
        lambda: ConfidenceSequence(alpha=0.0),
        lambda: ConfidenceSequence(alpha=0.05, bound=math.inf),
        lambda: ConfidenceSequence(0.05).update_many([0.5, 1.5]),
        lambda: ConfidenceSequence(0.05).update_one(math.nan),
        lambda: losses_many("accuracy", [1, 2], [0.5, 0.5]),
        lambda: losses_many("accuracy", [1, 0], [0.5, 1.1]),
        lambda: losses_many("accuracy", [1, 0], [0.5]),
        lambda: losses_many("roc_auc", [1], [0.5]),  # type: ignore[arg-type]
        lambda: loss_bound("brier"),  # type: ignore[arg-type]
        lambda: Evidence("accuracy").add_one("shadow", 1, 0.5),  # type: ignore[arg-type]
        lambda: RolloutStep(weight=1.5),
        lambda: RolloutStep(weight=0.5, min_labels=0),
        lambda: RolloutStep(weight=0.5, max_duration_s=0),
        lambda: RolloutStep(weight=0.5, on_timeout="retry"),  # type: ignore[arg-type]
        lambda: RolloutPlan(steps=()),
        lambda: RolloutPlan.of([0.0, 0.5, 0.5]),
        lambda: RolloutPlan.of([0.0, 1.0], margin=-0.01),
        lambda: RolloutPlan.of([0.0, 1.0], alpha=1.0),
    ],
)
def test_invalid_arguments_are_rejected_with_a_reason(call: Callable[[], object]) -> None:
    with pytest.raises(ValueError, match=r"\w+"):
        call()


# (d) the step machine


PLAN = RolloutPlan.of([0.0, 0.05, 0.25, 0.5, 1.0], min_labels=100, max_duration_s=60, margin=0.02)
GOOD = (-0.1, 0.01)  # difference bounds that pass the gate
UNSURE = (-0.1, 0.05)
BAD = (0.03, 0.2)


def view(n: int, bounds: tuple[float, float]) -> EvidenceView:
    return EvidenceView(n, n, *bounds)


def test_steps_advance_in_order_and_the_last_promotes() -> None:
    state, kinds, weights = RolloutState.begin(0.0), [], []
    for k in range(1, 6):
        action, state = next_action(PLAN, state, view(100 * k, GOOD), now_s=float(k))
        kinds.append(action.kind)
        weights.append(action.weight)
        assert action.step == min(k, 4)
    assert kinds == [ActionKind.ADVANCE] * 4 + [ActionKind.PROMOTE]
    assert weights == [0.05, 0.25, 0.5, 1.0, 1.0]
    assert state.outcome == "promoted"
    action, _ = next_action(PLAN, state, view(1000, BAD), now_s=9.0)  # finished stays finished
    assert (action.kind, action.reason) == (ActionKind.STAY, "finished: promoted")


def test_min_labels_are_counted_per_step_and_per_version() -> None:
    state = RolloutState.begin(0.0)
    action, state = next_action(PLAN, state, EvidenceView(99, 500, *GOOD), 1.0)
    assert action.kind is ActionKind.STAY
    assert "candidate 99/100" in action.reason
    action, state = next_action(PLAN, state, EvidenceView(100, 500, *GOOD), 2.0)
    assert action.kind is ActionKind.ADVANCE
    # the next step needs 100 more of each, however strong the evidence so far
    action, state = next_action(PLAN, state, EvidenceView(199, 700, -1.0, -0.5), 3.0)
    assert action.kind is ActionKind.STAY
    action, state = next_action(PLAN, state, EvidenceView(200, 600, *GOOD), 4.0)
    assert action.kind is ActionKind.ADVANCE
    # no abort before min_labels either
    action, state = next_action(PLAN, state, EvidenceView(250, 800, *BAD), 5.0)
    assert action.kind is ActionKind.STAY
    assert verdict(EvidenceView(250, 800, *BAD), 0.02, 100) is Verdict.ABORT


def test_a_worse_candidate_is_aborted_back_to_the_incumbent() -> None:
    action, state = next_action(PLAN, RolloutState.begin(0.0), view(100, BAD), 1.0)
    assert (action.kind, action.weight, state.outcome) == (ActionKind.ABORT, None, "aborted")
    assert action.reason.startswith("worse: difference in [0.03, 0.2]")


def test_timeout_holds_then_only_an_abort_or_a_resume_moves_it() -> None:
    state = RolloutState.begin(0.0)
    action, state = next_action(PLAN, state, view(500, UNSURE), 59.9)
    assert action.kind is ActionKind.STAY
    action, state = next_action(PLAN, state, view(500, UNSURE), 60.0)
    assert (action.kind, action.weight, state.held) == (ActionKind.HOLD, 0.0, True)
    action, state = next_action(PLAN, state, view(600, GOOD), 61.0)  # held: no advance
    assert (action.kind, state.step) == (ActionKind.STAY, 0)
    state = resume(state, now_s=100.0)
    action, state = next_action(PLAN, state, view(600, GOOD), 101.0)
    assert (action.kind, state.step) == (ActionKind.ADVANCE, 1)
    held = replace(state, held=True)
    action, _ = next_action(PLAN, held, view(800, BAD), 102.0)  # a held rollout still aborts
    assert action.kind is ActionKind.ABORT
    with pytest.raises(ValueError, match="finished"):
        resume(next_action(PLAN, held, view(800, BAD), 102.0)[1], 103.0)


def test_timeout_aborts_when_the_step_says_so() -> None:
    plan = RolloutPlan(
        steps=(RolloutStep(0.0, 100, 60.0, "abort"), RolloutStep(1.0, 100, 60.0, "hold")),
        metric="accuracy",
        margin=0.01,
    )
    action, state = next_action(plan, RolloutState.begin(0.0), view(50, UNSURE), 60.0)
    assert (action.kind, action.weight, state.outcome) == (ActionKind.ABORT, None, "aborted")
    assert "timed out after 60 s" in action.reason


def test_replaying_the_same_labels_and_clock_gives_the_same_decisions() -> None:
    """The driver's loop over a seeded label stream, run twice from scratch."""

    def drive() -> list[tuple[str, int, float | None, str]]:
        rng = np.random.default_rng(23)
        plan = RolloutPlan.of(
            [0.0, 0.1, 0.5, 1.0],
            min_labels=200,
            max_duration_s=3600,
            metric="accuracy",
            margin=0.02,
        )
        evidence = plan.evidence()
        state, log = RolloutState.begin(0.0), []
        for tick in range(400):
            weight = plan.steps[state.step].weight
            y = rng.random(50) < 0.5
            cand_p = np.where(rng.random(50) < 0.88, y, ~y).astype(float)
            inc_p = np.where(rng.random(50) < 0.80, y, ~y).astype(float)
            shadow = weight == 0.0
            to_cand = np.ones(50, bool) if shadow else rng.random(50) < weight
            evidence.add_many("candidate", y[to_cand], cand_p[to_cand])
            to_inc = np.ones(50, bool) if shadow else ~to_cand
            evidence.add_many("incumbent", y[to_inc], inc_p[to_inc])
            action, state = next_action(plan, state, evidence.view(), now_s=tick * 1.5)
            log.append((action.kind.value, action.step, action.weight, action.reason))
            if state.outcome != "running":
                break
        return log

    first, second = drive(), drive()
    assert first == second
    kinds = [k for k, *_ in first if k != "stay"]
    assert kinds == ["advance", "advance", "advance", "promote"]
