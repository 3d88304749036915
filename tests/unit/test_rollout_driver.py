"""The rollout driver's state machine, against a real routing table and a fake clock: its
decisions become commands the table applies, a driver that takes over rebuilds from the log,
two drivers never apply conflicting steps."""

from __future__ import annotations

import itertools
import time
from typing import Any

import numpy as np
import orjson
import pytest

from stream_infer.core import control
from stream_infer.core.control import RoutingTable, parse_command, seal
from stream_infer.core.rollout import Evidence
from stream_infer.core.routing import Route
from stream_infer.errors import ControlError
from stream_infer.online.rollout import RolloutDriver, session_alpha

T0 = 1_700_000_000.0
_IDS = itertools.count()


class Log:
    """A control log and the table every worker builds from it."""

    def __init__(self) -> None:
        self.table = RoutingTable.initial(
            {"risk": ("v1", "v2"), "spam": ("a", "b")}, {"risk": "v1", "spam": "a"}, now=T0
        )
        self.applied: list[dict[str, Any]] = []
        self.rejected: list[tuple[dict[str, Any], str]] = []
        self.takeovers: list[dict[str, Any]] = []

    def write(self, doc: dict[str, Any], now: float) -> None:
        sealed = seal(doc, None, now)
        try:
            self.table.apply(parse_command(orjson.dumps(sealed)), now)
            self.applied.append(sealed)
        except ControlError as exc:
            self.rejected.append((sealed, exc.reason))

    def start(self, plan: dict[str, Any], now: float = T0) -> str:
        doc = {"id": f"cmd-{next(_IDS)}", "command": "rollout", "model": "risk", "version": "v2"}
        self.write(doc | {"plan": plan}, now)
        return str(doc["id"])

    def tick(self, driver: RolloutDriver, now: float, *, driving: bool = True) -> list[str]:
        docs = driver.tick(
            dict(self.table.rollouts), self.table.generation, driving=driving, now=now
        )
        for doc in docs:
            self.write(doc, now)
        # a driving session begins with a logged takeover (counted apart: not a step)
        self.takeovers += [d for d in docs if d["rollout"]["decision"] == "takeover"]
        return [d["rollout"]["decision"] for d in docs if d["rollout"]["decision"] != "takeover"]


def feed(
    driver: RolloutDriver,
    version: str,
    n: int,
    accuracy: float,
    seed: int,
    generation: int = -1,
) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.5
    right = rng.random(n) < accuracy
    for y, ok in zip(labels.tolist(), right.tolist(), strict=True):
        p = 0.9 if y == ok else 0.1
        driver.observe("risk", version, float(y), p, generation)


PLAN = {"steps": [0, 0.5, 1], "metric": "accuracy", "min_labels": 200, "margin": 0.02}


def test_a_better_candidate_is_promoted_step_by_step() -> None:
    log, driver, now = Log(), RolloutDriver(), T0
    rid = log.start(PLAN)
    decisions: list[str] = []
    routes = []
    for i in range(40):
        now += 1.0
        decisions += log.tick(driver, now)  # first tick: it learns what it watches
        feed(driver, "v2", 150, 0.95, seed=2 * i)
        feed(driver, "v1", 150, 0.6, seed=2 * i + 1)
        routes.append(log.table.routes["risk"])
        if log.table.rollouts["risk"].outcome != "running":
            break
    assert decisions == ["advance", "advance", "promote"]
    assert log.table.routes["risk"] == Route.single("v2")
    assert Route(weights=(("v1", 0.5), ("v2", 0.5))) in routes
    assert log.table.rollouts["risk"].outcome == "promoted" and log.rejected == []
    # every step command names the rollout and carries its evidence
    steps = [d for d in log.applied if "rollout" in d and d["command"] != "rollout"]
    assert all(d["rollout"]["id"] == rid and d["rollout"]["evidence"] for d in steps)


def test_labels_of_events_an_earlier_step_served_do_not_pass_a_step() -> None:
    log, driver, now = Log(), RolloutDriver(), T0
    log.start(PLAN)
    while log.table.rollouts["risk"].step == 0:
        now += 1.0
        served = log.table.generation  # what serves now: step 0's routing
        feed(driver, "v2", 150, 0.95, seed=int(now), generation=served)
        feed(driver, "v1", 150, 0.6, seed=int(now) + 1, generation=served)
        log.tick(driver, now)
    began = log.table.rollouts["risk"].step_generation
    assert began == log.table.generation
    # plenty of labels, stamped by the learning thread after step 1 began, but of events
    # step 0's routing served (the serving snapshot's generation says so, not a clock)
    for i in range(5):
        now += 1.0
        feed(driver, "v2", 300, 0.95, seed=100 + i, generation=began - 1)
        feed(driver, "v1", 300, 0.6, seed=200 + i, generation=began - 1)
        assert log.tick(driver, now) == []
    status = driver.status()["rollouts"]["risk"]["evidence"]
    assert status["at_step"] == {"candidate": 0, "incumbent": 0}
    assert status["versions"]["v2"]["labels"] > 1500  # they fed the bounds all the same
    now += 1.0
    feed(driver, "v2", 250, 0.95, seed=300, generation=began)
    feed(driver, "v1", 250, 0.6, seed=301, generation=began)
    assert log.tick(driver, now) == ["advance"]


def test_a_step_made_stale_by_another_command_is_decided_again_at_once() -> None:
    log, driver = Log(), RolloutDriver(resend_s=600.0)
    log.start(PLAN)
    log.tick(driver, T0 + 1)
    feed(driver, "v2", 300, 0.95, seed=1)
    feed(driver, "v1", 300, 0.6, seed=2)
    docs = driver.tick(dict(log.table.rollouts), log.table.generation, driving=True, now=T0 + 2)
    assert [d["rollout"]["decision"] for d in docs] == ["advance"]
    log.write({"id": "other", "command": "swap", "model": "spam", "version": "b"}, T0 + 2)
    log.write(docs[0], T0 + 2)  # computed before the swap: stale
    assert [r for _, r in log.rejected] == [control.STALE]
    assert log.tick(driver, T0 + 3) == ["advance"]  # not after resend_s: the table moved on
    assert log.table.rollouts["risk"].step == 1


def test_a_worse_candidate_is_aborted_at_its_first_gate() -> None:
    log, driver, now = Log(), RolloutDriver(), T0
    log.start(PLAN)
    decisions: list[str] = []
    for i in range(40):
        now += 1.0
        decisions += log.tick(driver, now)
        feed(driver, "v2", 150, 0.5, seed=2 * i)
        feed(driver, "v1", 150, 0.95, seed=2 * i + 1)
        if log.table.rollouts["risk"].outcome != "running":
            break
    assert decisions == ["abort"]
    assert log.table.routes["risk"] == Route.single("v1")  # the shadow is gone too
    assert log.table.rollouts["risk"].step == 0


def test_a_step_that_times_out_holds_or_aborts_as_the_plan_says() -> None:
    for on_timeout, expected in (("hold", ["hold"]), ("abort", ["abort"])):
        log, driver = Log(), RolloutDriver()
        log.start(PLAN | {"max_duration_s": 30, "on_timeout": on_timeout}, now=T0)
        decisions = []
        for t in (1.0, 10.0, 29.0, 31.0, 40.0, 80.0):
            decisions += log.tick(driver, T0 + t)
            feed(driver, "v2", 5, 0.9, seed=int(t))  # never enough labels
        assert decisions == expected, on_timeout
    # the abort left nothing held to resume
    log.write({"id": "resume-1", "command": "rollout", "model": "risk", "action": "resume"}, T0)
    assert [r for _, r in log.rejected] == [control.ROLLOUT_CONFLICT]


def test_a_held_rollout_resumes_and_keeps_its_evidence() -> None:
    log, driver = Log(), RolloutDriver()
    log.start(PLAN | {"max_duration_s": 5}, now=T0)
    log.tick(driver, T0 + 1)
    feed(driver, "v2", 50, 0.9, seed=1)
    feed(driver, "v1", 50, 0.9, seed=2)
    assert log.tick(driver, T0 + 6) == ["hold"]
    assert log.table.rollouts["risk"].held
    assert log.tick(driver, T0 + 7) == []  # held: nothing more
    log.write({"id": "resume-2", "command": "rollout", "model": "risk", "action": "resume"}, T0 + 8)
    assert not log.table.rollouts["risk"].held
    log.tick(driver, T0 + 9)
    view = driver.status()["rollouts"]["risk"]["evidence"]["versions"]
    assert view["v2"]["labels"] == 50 and view["v1"]["labels"] == 50


def test_a_driver_that_takes_over_resumes_from_the_last_step_commands_evidence() -> None:
    log, old, now = Log(), RolloutDriver(), T0
    log.start(PLAN)
    for i in range(20):
        now += 1.0
        log.tick(old, now)
        feed(old, "v2", 150, 0.95, seed=2 * i)
        feed(old, "v1", 150, 0.6, seed=2 * i + 1)
        if log.table.rollouts["risk"].step == 1:
            break
    record = log.table.rollouts["risk"]
    assert record.step == 1 and record.evidence is not None
    carried = record.evidence
    # the old driver dies (its memory with it); another worker gets partition 0: at its first
    # look it waits resend_s (the old one may still drive), then takes over
    new = RolloutDriver()
    now += 1.0
    assert log.tick(new, now) == []
    assert log.table.rollouts["risk"].sessions == 1
    now += 10.0
    assert log.tick(new, now) == []
    status = new.status()["rollouts"]["risk"]
    assert status["evidence"]["restored_from_log"]
    assert status["evidence"]["versions"]["v2"]["labels"] == carried["candidate"]["labels"]
    # the second driving session: its level is alpha * 6 / (pi^2 * 2^2)
    assert log.table.rollouts["risk"].sessions == 2 and len(log.takeovers) == 2
    assert status["evidence"]["session"] == 2
    restored = Evidence.restored("accuracy", session_alpha(0.05, 2) / 2, carried)
    assert status["evidence"]["difference"]["upper"] == restored.view().upper
    decisions: list[str] = []
    for i in range(20):
        now += 1.0
        feed(new, "v2", 150, 0.95, seed=100 + 2 * i)
        feed(new, "v1", 150, 0.6, seed=101 + 2 * i)
        decisions += log.tick(new, now)
        if log.table.rollouts["risk"].outcome != "running":
            break
    assert decisions == ["advance", "promote"]
    assert log.table.routes["risk"] == Route.single("v2")


def test_a_worker_that_does_not_drive_sends_nothing_and_keeps_no_evidence() -> None:
    log, driver, now = Log(), RolloutDriver(), T0
    log.start(PLAN)
    for i in range(10):
        now += 1.0
        assert log.tick(driver, now, driving=False) == []
        feed(driver, "v2", 300, 0.95, seed=i)
        feed(driver, "v1", 300, 0.5, seed=i + 50)
    assert driver.status() == {"driving": False, "rollouts": {}}
    assert log.table.rollouts["risk"].step == 0


def test_two_drivers_at_once_never_apply_conflicting_steps() -> None:
    """A rebalance can briefly leave two workers that think they own partition 0: their
    commands are derived from the same table, so the log applies one decision per generation."""
    log, a, b, now = Log(), RolloutDriver(), RolloutDriver(), T0
    log.start(PLAN)
    for i in range(40):
        now += 1.0
        for driver, seed in ((a, i), (b, 1000 + i)):
            docs = driver.tick(
                dict(log.table.rollouts), log.table.generation, driving=True, now=now
            )
            feed(driver, "v2", 150, 0.95, seed=seed)
            feed(driver, "v1", 150, 0.6, seed=seed + 7)
            for doc in docs:
                log.write(doc, now)
        if log.table.rollouts["risk"].outcome != "running":
            break
    decisions = [
        d["rollout"]["decision"]
        for d in log.applied
        if "rollout" in d and d["command"] != "rollout"
    ]
    assert decisions == ["advance", "advance", "promote"]
    assert all(r in (control.DUPLICATE, control.STALE) for _, r in log.rejected)


def test_failed_and_out_of_range_predictions_count_as_the_most_wrong_answer() -> None:
    log, driver = Log(), RolloutDriver()
    log.start(PLAN)
    log.tick(driver, T0 + 1)
    driver.observe("risk", "v2", 1.0, float("nan"))  # the version failed on the event
    driver.observe("risk", "v2", 1.0, 3.0)  # out of [0, 1]
    driver.observe("risk", "v2", 1.0, 0.8)
    log.tick(driver, T0 + 2)
    ev = driver.status()["rollouts"]["risk"]["evidence"]
    assert ev["invalid_predictions"] == 2 and ev["versions"]["v2"]["labels"] == 3
    assert ev["versions"]["v2"]["mean"] == pytest.approx(2 / 3)  # two errors in three


def test_a_candidate_that_fails_on_a_fifth_of_its_events_is_aborted() -> None:
    """The candidate answers as well as the incumbent where it answers, but fails (NaN) on
    20 % of the events: counted against it, it is aborted; left out, it would be promoted."""
    log, driver, now = Log(), RolloutDriver(), T0
    log.start(PLAN)
    rng = np.random.default_rng(5)
    decisions: list[str] = []
    for _ in range(60):
        now += 1.0
        decisions += log.tick(driver, now)
        if log.table.rollouts["risk"].outcome != "running":
            break
        for version in ("v1", "v2"):
            labels = rng.random(300) < 0.5
            right = rng.random(300) < 0.9
            failed = rng.random(300) < (0.2 if version == "v2" else 0.0)
            for y, ok, bad in zip(labels.tolist(), right.tolist(), failed.tolist(), strict=True):
                p = float("nan") if bad else 0.9 if y == ok else 0.1
                driver.observe("risk", version, float(y), p)
    assert decisions == ["abort"]
    assert log.table.routes["risk"] == Route.single("v1")


@pytest.mark.parametrize("bad", [{"candidate": {}}, {"candidate": {"labels": 1, "state": [1]}}])
def test_evidence_that_cannot_be_restored_starts_afresh(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"Evidence\.restored"):
        Evidence.restored("accuracy", 0.05, bad)


# --- the wiring: the learning service feeds the driver joined labels and publishes its steps --


def test_the_learning_service_drives_only_with_partition_0_and_publishes_sealed_steps() -> None:
    from stream_infer.core.events import FeatureBatch
    from stream_infer.observability import Metrics
    from stream_infer.runtime.learning import LearningService
    from stream_infer.settings import parse_topology

    topo = parse_topology(
        {
            "name": "t",
            "topics": {
                "input": "in",
                "predictions": "out",
                "dead_letter": "dlq",
                "control": "ctl",
                "labels": "labels",
                "shadow": "shadow",
            },
            "features": ["a"],
            "models": [
                {
                    "name": "risk",
                    "serving": "v1",
                    "versions": [{"version": "v1", "path": "m"}, {"version": "v2", "path": "m"}],
                }
            ],
            "online": {"rollouts": True},
            "device": "cpu",
        },
        env={},
    )
    log = Log()
    # the service's clock is the wall clock: the rollout starts now
    plan = {"steps": [0, 1], "metric": "accuracy", "min_labels": 50, "margin": 0.05}
    log.start(plan, now=time.time())
    published: list[Any] = []
    metrics = Metrics()
    service = LearningService(
        topo,
        metrics,
        publish=published.extend,
        predictors=dict,
        routes=lambda: log.table.routes,
        rollouts=lambda: (log.table.generation, dict(log.table.rollouts)),
        worker_id="w-1",
    )

    def serve_and_label(n: int, start: int) -> None:
        ids = [f"e{start + i}" for i in range(n)]
        batch = FeatureBatch(
            ids, [b"k"] * n, [None] * n, list(range(n)), np.zeros((n, 1), np.float32)
        )
        # both versions score every event (step 0 shadows v2); v2 is right, v1 is wrong
        scored = [("risk", "v1", ids, np.full(n, 0.1)), ("risk", "v2", ids, np.full(n, 0.9))]
        service._on_scored(batch, scored, [0] * n)
        service._on_labels([(i, 1.0) for i in ids])

    service.assigned([1, 2])  # not partition 0: it does not drive
    service.drive_rollouts()
    serve_and_label(200, 0)
    service.drive_rollouts()
    assert published == []
    assert service.rollout_driver.status() == {"driving": False, "rollouts": {}}
    service.assigned([0, 3])  # now it owns partition 0
    service.drive_rollouts()  # it starts watching (labels from now on count) and takes over
    [takeover] = published
    assert orjson.loads(takeover.value)["action"] == "takeover"
    log.write(orjson.loads(takeover.value), time.time())
    published.clear()
    serve_and_label(200, 1000)
    service.drive_rollouts()
    [record] = published
    doc = orjson.loads(record.value)
    assert record.topic == "ctl" and doc["id"] == record.key.decode()
    assert (doc["command"], doc["weights"], doc["rollout"]["decision"]) == (
        "split",
        {"v2": 1.0},
        "advance",
    )
    assert doc["rollout"]["driver"] == "w-1" and "issued_at" in doc  # sealed
    assert doc["rollout"]["evidence"]["candidate"]["labels"] == 200
    text = metrics.registry.get_sample_value
    assert text("stream_infer_rollout_driver") == 1
    assert text("stream_infer_rollout_labels", {"model": "risk", "version": "v2"}) == 200
    assert text("stream_infer_rollout_step", {"model": "risk"}) == 0
    assert (
        text("stream_infer_rollout_decisions_total", {"model": "risk", "decision": "advance"}) == 1
    )
