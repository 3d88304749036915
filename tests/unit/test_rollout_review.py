"""What a rollout's evidence and record must not get wrong (the review of issue 17): a version's
failures count against it, a step's labels are those its routing served, the record's times are
the log's, a step's body is what its plan says, and a plan the topology cannot score is refused.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import pytest

from stream_infer.core import control, serde
from stream_infer.core.control import Command, RoutingTable, parse_command, seal
from stream_infer.core.events import FeatureBatch, Record
from stream_infer.core.pipeline import ModelOutput, Pipeline, RoutingSnapshot
from stream_infer.core.routing import Route
from stream_infer.core.serde import FeatureDecoder
from stream_infer.errors import ControlError
from stream_infer.online.loop import LearningLoop
from stream_infer.settings import OnlineSettings

T0 = 1_700_000_000.0
DECLARED = {"risk": ("v1", "v2", "v3")}
PLAN = {"steps": [0, 0.25, 0.5, 1], "metric": "accuracy", "min_labels": 10, "margin": 0.01}
_IDS = itertools.count()


# --- S2: a version's failed rows reach the rollout, as NaN -----------------------------------


class Fake:
    def __init__(self, model: str, version: str, fn: Any) -> None:
        self.model, self.version, self.fn = model, version, fn

    def predict_many(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        return self.fn(x)  # type: ignore[no-any-return]


def _fails_on_13(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    if (x[:, 0] == 13).any():
        raise RuntimeError("13")
    return np.full(len(x), 0.5)


def _records(make_record: Any, values: list[float]) -> list[Record]:
    return [
        make_record(json.dumps({"id": f"e{i}", "features": [v, 0.0]}).encode(), b"k", offset=i)
        for i, v in enumerate(values)
    ]


@pytest.mark.parametrize("where", ["serving", "shadow"])
def test_the_rows_a_version_fails_are_scored_as_nan_with_the_serving_generation(
    make_record: Any, where: str
) -> None:
    failing = Fake("risk", "v2", _fails_on_13)
    fine = Fake("risk", "v1", lambda x: np.full(len(x), 0.25))
    route = Route.single("v1").with_shadow("v2") if where == "shadow" else Route.single("v2")
    snapshot = RoutingSnapshot(
        routes={"risk": route},
        predictors={("risk", "v1"): fine, ("risk", "v2"): failing},
        generation=7,
    )
    pipeline = Pipeline(
        FeatureDecoder(("f0", "f1"), max_event_bytes=1024),
        [ModelOutput("risk", "t.pred")],
        dead_letter_topic="t.dlq",
        shadow_topic="t.shadow",
        clock=lambda: T0,
        track_scores=True,
    )
    result = pipeline.process(_records(make_record, [1.0, 13.0, 2.0]), snapshot)
    [scored] = [s for s in result.scored if s[1] == "v2"]
    model, version, ids, values, generation = scored
    assert (model, version, ids, generation) == ("risk", "v2", ["e0", "e1", "e2"], 7)
    assert values[0] == 0.5 and np.isnan(values[1]) and values[2] == 0.5
    # what is served and dead-lettered is as before: the failed row is not published
    topic = "t.shadow" if where == "shadow" else "t.pred"
    published = [orjson.loads(r.value)["id"] for r in result.records if r.topic == topic]
    assert published == ["e0", "e2"]
    letters = [d.reason for d in result.dead_letters]
    assert letters == ([] if where == "shadow" else [serde.MODEL_FAILED])


def test_a_failed_prediction_reaches_the_rollout_but_not_the_prequential_metric() -> None:
    seen: list[tuple[str, str, float, float, int]] = []
    loop = LearningLoop(
        OnlineSettings.model_validate({}),
        ("a", "b"),
        learners=list,
        routes=lambda: {"risk": Route.single("v2")},
        wall_clock=lambda: 1000.0,
        on_labelled=lambda *args: seen.append(args),
    )
    ids = ["e0", "e1"]
    batch = FeatureBatch(ids, [b"k"] * 2, [None] * 2, [0, 1], np.ones((2, 2), dtype=np.float32))
    loop.scored_many(batch, [("risk", "v2", ids, np.array([0.9, np.nan]), 4)])
    loop.labels_many([("e0", 1.0), ("e1", 1.0)])
    assert [(s[0], s[1], s[2], s[4]) for s in seen] == [("risk", "v2", 1.0, 4)] * 2
    assert seen[0][3] == 0.9 and np.isnan(seen[1][3])
    assert loop.prequential[("risk", "v2")].n == 1  # type: ignore[index]


# --- the routing table ------------------------------------------------------------------------


def _cmd(doc: dict[str, Any], *, at: float | None = T0, record_ts: float | None = None) -> Command:
    doc = {"id": f"c-{next(_IDS)}"} | doc
    if at is not None:
        doc = seal(doc, None, at)
    return parse_command(orjson.dumps(doc), record_ts=record_ts)


def _start(plan: dict[str, Any] = PLAN, **kw: Any) -> Command:
    return _cmd({"command": "rollout", "model": "risk", "version": "v2", "plan": plan}, **kw)


def _step(t: RoutingTable, decision: str, step: int, body: dict[str, Any]) -> Command:
    record = t.rollouts["risk"]
    tag = {"id": record.id, "step": step, "decision": decision}
    doc = {"model": "risk", **body, "rollout": tag, "if_generation": t.generation}
    return _cmd(doc, at=T0 + 10 * (step + 1))


def _reason(t: RoutingTable, c: Command) -> str:
    with pytest.raises(ControlError) as info:
        t.apply(c, now=T0)
    return info.value.reason


def test_two_tables_applying_an_unsealed_rollout_at_different_times_agree() -> None:
    """D1: a command without issued_at is timed by its record in the log, never by the clock of
    the machine that applies it (a replay an hour later holds the same record)."""
    raw = orjson.dumps(
        {"id": "r1", "command": "rollout", "model": "risk", "version": "v2", "plan": PLAN}
    )
    records = []
    for applied_at in (T0 + 5, T0 + 3600):
        t = RoutingTable.initial(DECLARED, {"risk": "v1"}, now=T0)
        t.apply(parse_command(raw, record_ts=T0 + 1), now=applied_at)
        records.append(t.rollouts["risk"].as_dict())
    assert records[0] == records[1]
    assert records[0]["started_at"] == records[0]["step_started_at"] == T0 + 1
    # with no time at all (neither issued_at nor a record time) a rollout is refused
    t = RoutingTable.initial(DECLARED, {"risk": "v1"}, now=T0)
    assert _reason(t, _start(at=None)) == control.INVALID_ROLLOUT
    assert "risk" not in t.rollouts


def test_a_step_is_counted_from_the_generation_its_command_made() -> None:
    """S5: the record names the routing generation of each step (start, advance)."""
    t = RoutingTable.initial(DECLARED, {"risk": "v1"}, now=T0)
    t.apply(_start(), now=T0)
    assert t.rollouts["risk"].step_generation == t.generation == 1
    t.apply(_step(t, "advance", 1, {"command": "split", "weights": {"v1": 0.75, "v2": 0.25}}), T0)
    assert t.rollouts["risk"].step_generation == t.generation == 2
    assert t.rollouts["risk"].as_dict()["step_generation"] == 2


@pytest.mark.parametrize(
    ("decision", "step", "body"),
    [
        # an advance that splits with another version than the candidate
        ("advance", 1, {"command": "split", "weights": {"v1": 0.5, "v3": 0.5}}),
        # an advance with the right versions but not the step's weight
        ("advance", 1, {"command": "split", "weights": {"v1": 0.5, "v2": 0.5}}),
        # a promote before the last step
        ("promote", 0, {"command": "swap", "version": "v2"}),
        # a promote to another version
        ("promote", 0, {"command": "swap", "version": "v3"}),
        # an abort that swaps to another version than the incumbent
        ("abort", 0, {"command": "swap", "version": "v3"}),
        # a hold that changes the routing
        ("hold", 0, {"command": "split", "weights": {"v1": 0.75, "v2": 0.25}}),
    ],
)
def test_a_step_whose_body_does_not_match_its_plan_is_rejected(
    decision: str, step: int, body: dict[str, Any]
) -> None:
    """D2: the tag says what the step is; the body must do exactly that."""
    t = RoutingTable.initial(DECLARED, {"risk": "v1"}, now=T0)
    t.apply(_start(), now=T0)
    before = (t.routes["risk"], t.rollouts["risk"], t.generation)
    assert _reason(t, _step(t, decision, step, body)) == control.INVALID_ROLLOUT
    assert (t.routes["risk"], t.rollouts["risk"], t.generation) == before


def test_steps_that_match_the_plan_are_applied() -> None:
    t = RoutingTable.initial(DECLARED, {"risk": "v1"}, now=T0)
    t.apply(_start(), now=T0)
    t.apply(_step(t, "advance", 1, {"command": "split", "weights": {"v1": 0.75, "v2": 0.25}}), T0)
    t.apply(_step(t, "advance", 2, {"command": "split", "weights": {"v2": 0.5, "v1": 0.5}}), T0)
    t.apply(_step(t, "advance", 3, {"command": "split", "weights": {"v2": 1.0}}), T0)
    assert t.routes["risk"] == Route.single("v2")
    promote = _step(t, "promote", 3, {"command": "swap", "version": "v2"})
    t.apply(promote, T0)
    assert t.rollouts["risk"].outcome == "promoted"


def test_an_abort_swaps_to_the_incumbent() -> None:
    t = RoutingTable.initial(DECLARED, {"risk": "v1"}, now=T0)
    t.apply(_start(), now=T0)
    t.apply(_step(t, "abort", 0, {"command": "swap", "version": "v1"}), T0)
    assert t.rollouts["risk"].outcome == "aborted"
    assert t.routes["risk"] == Route.single("v1")


# --- T1, S4: a takeover is logged; it restarts the step's clock and counts a session ---------


class _Log:
    """A control log every driver writes to and its table (unsealed docs sealed at ``now``)."""

    def __init__(self, plan: dict[str, Any]) -> None:
        self.table = RoutingTable.initial(DECLARED, {"risk": "v1"}, now=T0)
        self.table.apply(_start(plan, at=T0), now=T0)

    def tick(self, driver: Any, now: float) -> list[str]:
        docs = driver.tick(dict(self.table.rollouts), self.table.generation, driving=True, now=now)
        for doc in docs:
            self.table.apply(parse_command(orjson.dumps(seal(doc, None, now))), now)
        return [str(d["rollout"]["decision"]) for d in docs]


def _feed(driver: Any, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for version in ("v1", "v2"):
        for y in (rng.random(n) < 0.5).tolist():
            driver.observe("risk", version, float(y), 0.8 if y else 0.2)


def test_a_takeover_restarts_the_steps_clock_so_the_new_driver_is_not_timed_out() -> None:
    from stream_infer.online.rollout import RolloutDriver

    log = _Log(PLAN | {"min_labels": 500, "max_duration_s": 30, "on_timeout": "hold"})
    old = RolloutDriver("a")
    assert log.tick(old, T0 + 1) == ["takeover"]
    for t in range(2, 26):
        _feed(old, 10, seed=t)  # not enough labels for the step yet
        assert log.tick(old, T0 + t) == []
    # the old driver dies at T0 + 25 with its labels; another looks at T0 + 16 (a rebalance
    # gave it partition 0; it waits resend_s) and takes over at T0 + 26
    new = RolloutDriver("b")
    assert log.tick(new, T0 + 16) == []
    assert log.tick(new, T0 + 26) == ["takeover"]
    record = log.table.rollouts["risk"]
    assert record.sessions == 2 and record.step_started_at == T0 + 26
    assert [d["decision"] for d in record.decisions] == ["start", "takeover", "takeover"]
    for t in range(27, 56):  # past T0 + 30, the old session's deadline: still gathering
        _feed(new, 10, seed=t)
        assert log.tick(new, T0 + t) == [], t
    assert log.tick(new, T0 + 56) == ["hold"]  # 30 s after the takeover


def test_each_driving_session_runs_at_its_own_share_of_alpha() -> None:
    """S4: session k's level is alpha * 6 / (pi^2 k^2): a driver that dies at step 0 before any
    step command and a fresh one that starts over do not spend alpha twice."""
    from stream_infer.online.rollout import RolloutDriver, session_alpha

    log = _Log(PLAN)
    levels = []
    for k, name in enumerate(("a", "b", "c"), start=1):
        driver = RolloutDriver(name)
        if k > 1:  # a first look at another's takeover: wait resend_s
            assert log.tick(driver, T0 + 20 * k - 10) == []
        assert log.tick(driver, T0 + 20 * k) == ["takeover"]
        log.tick(driver, T0 + 20 * k + 0.5)
        status = driver.status()["rollouts"]["risk"]["evidence"]
        assert log.table.rollouts["risk"].sessions == status["session"] == k
        levels.append(status["level"])
    assert levels == [session_alpha(0.05, k) for k in (1, 2, 3)]
    assert sum(session_alpha(0.05, k) for k in range(1, 10_000)) <= 0.05


def test_a_takeover_must_name_the_running_rollout_and_its_step() -> None:
    t = RoutingTable.initial(DECLARED, {"risk": "v1"}, now=T0)
    t.apply(_start(), now=T0)
    rid = t.rollouts["risk"].id
    doc = {"command": "rollout", "model": "risk", "action": "takeover"}
    wrong_step = _cmd(doc | {"rollout": {"id": rid, "step": 1, "decision": "takeover"}})
    assert _reason(t, wrong_step) == control.STALE
    wrong_id = _cmd(doc | {"rollout": {"id": "other", "step": 0, "decision": "takeover"}})
    assert _reason(t, wrong_id) == control.STALE
    as_split = _step(t, "takeover", 0, {"command": "split", "weights": {"v1": 1.0}})
    assert _reason(t, as_split) == control.INVALID_ROLLOUT
    with pytest.raises(ControlError):  # a takeover's tag says takeover
        _cmd(doc | {"rollout": {"id": rid, "step": 0, "decision": "hold"}})
    routes = dict(t.routes)
    t.apply(_cmd(doc | {"rollout": {"id": rid, "step": 0, "decision": "takeover"}}, at=T0 + 9), T0)
    assert t.rollouts["risk"].sessions == 1 and t.routes == routes


# --- S1: a step's own labels can abort it -------------------------------------------------


def test_a_candidate_that_turns_worse_at_a_later_step_is_aborted_on_that_steps_labels() -> None:
    """The review's case: 20,000 step-0 labels per version at error 0.1, then at step 1 the
    candidate's error is 0.4. The whole rollout's bounds hardly move; the step's own do."""
    from stream_infer.online.rollout import RolloutDriver

    plan = {"steps": [0, 0.5, 1], "metric": "accuracy", "min_labels": 500, "margin": 0.05}
    log = _Log(plan)
    driver = RolloutDriver("a")
    assert log.tick(driver, T0 + 1) == ["takeover"]
    rng = np.random.default_rng(11)

    def feed(version: str, n: int, error: float, generation: int) -> None:
        labels = rng.random(n) < 0.5
        wrong = rng.random(n) < error
        for y, w in zip(labels.tolist(), wrong.tolist(), strict=True):
            p = (0.2 if y else 0.8) if w else (0.8 if y else 0.2)
            driver.observe("risk", version, float(y), p, generation)

    generation = log.table.generation
    feed("v2", 20_000, 0.1, generation)
    feed("v1", 20_000, 0.1, generation)
    assert log.tick(driver, T0 + 2) == ["advance"]
    generation = log.table.rollouts["risk"].step_generation
    decisions = []
    for t in range(3, 13):
        feed("v2", 100, 0.4, generation)
        feed("v1", 100, 0.1, generation)
        decisions += log.tick(driver, T0 + t)
        if decisions:
            break
    assert decisions == ["abort"], decisions
    record = log.table.rollouts["risk"]
    assert record.outcome == "aborted" and "worse at step 1" in record.decisions[-1]["reason"]
    assert log.table.routes["risk"] == Route.single("v1")
    # the whole rollout's bounds alone would not have aborted it
    whole = driver.status()["rollouts"]
    assert not whole or whole["risk"]["evidence"]["difference"]["lower"] <= 0.05
