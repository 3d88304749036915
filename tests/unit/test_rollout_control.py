"""The ``rollout`` control command: parsing, and the routing table's rollout record (a pure
function of the log, so every worker holds the same)."""

from __future__ import annotations

import contextlib
import itertools
from typing import Any

import orjson
import pytest

from stream_infer.core import control
from stream_infer.core.control import (
    Command,
    RoutingTable,
    parse_command,
    seal,
)
from stream_infer.core.routing import Route
from stream_infer.errors import ControlError

DECLARED = {"risk": ("v1", "v2", "v3")}
T0 = 1_700_000_000.0
KEY = b"k3y"
PLAN = {"steps": [0, 0.25, 1], "metric": "accuracy", "min_labels": 10, "margin": 0.01}
_IDS = itertools.count()


def table() -> RoutingTable:
    return RoutingTable.initial(DECLARED, {"risk": "v1"}, now=T0)


def cmd(
    doc: dict[str, Any], *, issued_at: float | None = None, key: bytes | None = None
) -> Command:
    doc = {"id": f"c-{next(_IDS)}"} | doc
    if issued_at is not None or key is not None:
        doc = seal(doc, key, issued_at if issued_at is not None else T0)
    return parse_command(orjson.dumps(doc), hmac_key=key)


def start(plan: dict[str, Any] | None = None, version: str = "v2", at: float = T0) -> Command:
    doc = {"command": "rollout", "model": "risk", "version": version, "plan": plan or PLAN}
    return cmd(doc, issued_at=at)


def step(
    rollout_id: str, decision: str, step_no: int, body: dict[str, Any], generation: int, at: float
) -> Command:
    evidence = {
        "candidate": {"labels": 40, "state": [40, 4.0, 3.0, 10.0, 1.0, 0.5]},
        "incumbent": {"labels": 50, "state": [50, 9.0, 3.0, 10.0, 2.0, 0.5]},
    }
    tag = {"id": rollout_id, "step": step_no, "decision": decision, "evidence": evidence}
    doc = {"model": "risk", **body, "rollout": tag, "if_generation": generation}
    return cmd(doc, issued_at=at)


def reason(t: RoutingTable, c: Command) -> str:
    with pytest.raises(ControlError) as info:
        t.apply(c, now=T0)
    return info.value.reason


# --- parsing ----------------------------------------------------------------------------------


def test_a_signed_rollout_parses_with_its_plan() -> None:
    c = cmd(
        {"command": "rollout", "model": "risk", "version": "v2", "plan": PLAN},
        issued_at=T0,
        key=KEY,
    )
    assert (c.command, c.action, c.version, c.rollout) == ("rollout", "start", "v2", PLAN)
    plan = control.rollout_plan(c.rollout)
    assert [s.weight for s in plan.steps] == [0.0, 0.25, 1.0]
    assert plan.steps[1].min_labels == 10 and plan.margin == 0.01 and plan.metric == "accuracy"


@pytest.mark.parametrize(
    "plan",
    [
        {"steps": [0.5, 0.2]},
        {"steps": [0, 1.5]},
        {"steps": []},
        {"steps": "0,1"},
        {"metric": "f1"},
        {"margin": -0.1},
        {"margin": float("nan")},
        {"confidence": 1.0},
        {"confidence": 0},
        {"min_labels": 0},
        {"min_labels": 5.5},
        {"max_duration_s": 0},
        {"on_timeout": "wait"},
        {"typo": 1},
        "not an object",
    ],
)
def test_a_bad_plan_is_rejected_invalid_rollout(plan: Any) -> None:
    doc = {"id": "r", "command": "rollout", "model": "risk", "version": "v2", "plan": plan}
    with pytest.raises(ControlError) as info:
        parse_command(orjson.dumps(doc))
    assert info.value.reason == control.INVALID_ROLLOUT


@pytest.mark.parametrize(
    "doc",
    [
        {"command": "rollout", "model": "risk", "action": "pause"},
        {"command": "rollout", "model": "risk", "action": "hold"},  # no tag
        {"command": "split", "model": "risk", "weights": {"v1": 1}, "rollout": {"id": "x"}},
        {"command": "swap", "model": "risk", "version": "v2", "rollout": "r1"},
        {
            "command": "swap",
            "model": "risk",
            "version": "v2",
            "rollout": {"id": "r", "step": 1, "decision": "jump"},
        },
    ],
)
def test_a_bad_action_or_tag_is_rejected(doc: dict[str, Any]) -> None:
    with pytest.raises(ControlError) as info:
        parse_command(orjson.dumps({"id": "x"} | doc))
    assert info.value.reason == control.INVALID_ROLLOUT


def test_a_rollout_without_version_is_malformed() -> None:
    doc = {"id": "x", "command": "rollout", "model": "risk"}
    with pytest.raises(ControlError) as info:
        parse_command(orjson.dumps(doc))
    assert info.value.reason == control.MALFORMED


# --- the table --------------------------------------------------------------------------------


def test_a_rollout_routes_its_first_step_and_its_steps_move_the_record() -> None:
    t = table()
    s = start(at=T0 + 1)
    assert t.apply(s, now=0.0)
    assert t.routes["risk"] == Route.single("v1").with_shadow("v2")
    record = t.rollouts["risk"]
    assert (record.id, record.step, record.outcome, record.step_started_at) == (
        s.id,
        0,
        "running",
        T0 + 1,  # the command's issued_at, not this machine's clock
    )
    g = t.generation
    t.apply(
        step(
            s.id, "advance", 1, {"command": "split", "weights": {"v1": 0.75, "v2": 0.25}}, g, T0 + 5
        ),
        0.0,
    )
    assert t.routes["risk"] == Route(weights=(("v1", 0.75), ("v2", 0.25)))
    record = t.rollouts["risk"]
    assert (record.step, record.base, record.step_started_at) == (1, (40, 50), T0 + 5)
    assert record.evidence is not None and record.evidence["candidate"]["labels"] == 40
    g = t.generation
    t.apply(step(s.id, "advance", 2, {"command": "split", "weights": {"v2": 1.0}}, g, T0 + 9), 0.0)
    assert t.routes["risk"] == Route.single("v2")
    g = t.generation
    assert t.apply(step(s.id, "promote", 2, {"command": "swap", "version": "v2"}, g, T0 + 12), 0.0)
    assert t.rollouts["risk"].outcome == "promoted"
    assert t.generation == g + 1  # the route did not change, the rollout did
    decisions = [d["decision"] for d in t.rollouts["risk"].decisions]
    assert decisions == ["start", "advance", "advance", "promote"]
    assert t.as_dict()["rollouts"]["risk"]["outcome"] == "promoted"


def test_an_abort_routes_what_served_before_the_rollout_and_rollback_undoes_it() -> None:
    t = table()
    t.apply(cmd({"command": "shadow", "model": "risk", "version": "v3"}), 0.0)
    before = t.routes["risk"]
    s = start()
    t.apply(s, 0.0)
    g = t.generation
    t.apply(
        step(s.id, "advance", 1, {"command": "split", "weights": {"v1": 0.75, "v2": 0.25}}, g, T0),
        0.0,
    )
    t.apply(step(s.id, "abort", 1, {"command": "swap", "version": "v1"}, t.generation, T0), 0.0)
    assert t.routes["risk"] == before  # v1 alone, v3 still shadowing: as before
    assert t.rollouts["risk"].outcome == "aborted"
    t.apply(cmd({"command": "rollback", "model": "risk"}), 0.0)
    assert t.routes["risk"] == Route(weights=(("v1", 0.75), ("v2", 0.25)))


def test_a_stale_or_foreign_step_changes_nothing() -> None:
    t = table()
    s = start()
    t.apply(s, 0.0)
    g = t.generation
    split = {"command": "split", "weights": {"v1": 0.75, "v2": 0.25}}
    # an older generation (a driver that had not read as far)
    assert reason(t, step(s.id, "advance", 1, split, g - 1, T0)) == control.STALE
    # another rollout's id
    assert reason(t, step("other", "advance", 1, split, g, T0)) == control.STALE
    # a step that does not follow
    assert reason(t, step(s.id, "advance", 2, split, g, T0)) == control.STALE
    assert t.routes["risk"] == Route.single("v1").with_shadow("v2")
    assert t.rollouts["risk"].step == 0
    # two drivers deciding the same at the same generation: one applies, the copy is a duplicate
    first = step(s.id, "advance", 1, split, g, T0)
    t.apply(first, 0.0)
    assert reason(t, first) == control.DUPLICATE


def test_an_operators_routing_change_cancels_the_rollout_and_its_driver_steps_go_stale() -> None:
    t = table()
    s = start()
    t.apply(s, 0.0)
    t.apply(cmd({"command": "rollback", "model": "risk"}), 0.0)
    assert t.routes["risk"] == Route.single("v1")
    record = t.rollouts["risk"]
    assert record.outcome == "cancelled" and record.cancelled_by is not None
    split = {"command": "split", "weights": {"v1": 0.75, "v2": 0.25}}
    assert reason(t, step(s.id, "advance", 1, split, t.generation, T0)) == control.STALE
    # a status changes nothing and cancels nothing; a new rollout may start
    s2 = start(version="v3")
    t.apply(s2, 0.0)
    t.apply(cmd({"command": "status"}), 0.0)
    assert t.rollouts["risk"].id == s2.id and t.rollouts["risk"].outcome == "running"


def test_a_first_step_above_0_splits_in_the_declared_order() -> None:
    t = RoutingTable.initial({"risk": ("v1", "v2", "v3")}, {"risk": "v3"}, now=T0)
    t.apply(start({"steps": [0.1, 1]}, version="v1"), 0.0)
    # v1 is declared first: it owns the low buckets, as the driver's later splits will
    assert t.routes["risk"].weights == (("v1", 0.1), ("v3", 0.9))


def test_conflicting_rollouts_are_refused() -> None:
    t = table()
    assert reason(t, start(version="v1")) == control.ROLLOUT_CONFLICT  # the incumbent itself
    t.apply(start(), 0.0)
    assert reason(t, start(version="v3")) == control.ROLLOUT_CONFLICT  # one at a time
    t2 = table()
    t2.apply(cmd({"command": "split", "model": "risk", "weights": {"v1": 0.5, "v3": 0.5}}), 0.0)
    assert reason(t2, start()) == control.ROLLOUT_CONFLICT  # from a split
    assert reason(t2, start(version="v9")) == control.UNKNOWN_VERSION


def test_hold_and_resume() -> None:
    t = table()
    s = start()
    t.apply(s, 0.0)
    hold = cmd(
        {
            "command": "rollout",
            "model": "risk",
            "action": "hold",
            "rollout": {"id": s.id, "step": 0, "decision": "hold"},
            "if_generation": t.generation,
        },
        issued_at=T0 + 3,
    )
    t.apply(hold, 0.0)
    assert t.rollouts["risk"].held
    split = {"command": "split", "weights": {"v1": 0.75, "v2": 0.25}}
    assert reason(t, step(s.id, "advance", 1, split, t.generation, T0)) == control.STALE
    t.apply(
        cmd({"command": "rollout", "model": "risk", "action": "resume"}, issued_at=T0 + 60), 0.0
    )
    record = t.rollouts["risk"]
    assert not record.held and record.step_started_at == T0 + 60
    resume = cmd({"command": "rollout", "model": "risk", "action": "resume"}, issued_at=T0)
    assert reason(t, resume) == control.ROLLOUT_CONFLICT  # nothing held


def test_two_tables_that_read_the_same_log_agree() -> None:
    s = start()
    log = [
        s,
        step(s.id, "advance", 1, {"command": "split", "weights": {"v1": 0.75, "v2": 0.25}}, 1, T0),
        step(s.id, "advance", 1, {"command": "split", "weights": {"v1": 0.5, "v2": 0.5}}, 1, T0),
        step(s.id, "abort", 1, {"command": "swap", "version": "v1"}, 2, T0),
    ]
    tables = [table(), table()]
    for i, t in enumerate(tables):
        for c in log:
            with contextlib.suppress(ControlError):
                t.apply(c, now=float(i * 1000))  # a different local clock on each worker
    a, b = tables
    assert a.routes == b.routes and a.generation == b.generation
    assert a.rollouts["risk"].as_dict() == b.rollouts["risk"].as_dict()
    assert a.rollouts["risk"].outcome == "aborted"


def test_an_ack_carries_the_rollouts_and_the_drivers_view_and_fits_its_schema(
    validators: dict[str, Any],
) -> None:
    from stream_infer.online.rollout import RolloutDriver

    t = table()
    s = start()
    t.apply(s, now=0.0)
    driver = RolloutDriver("w-1")
    [takeover] = driver.tick(dict(t.rollouts), t.generation, driving=True, now=T0 + 1)
    t.apply(parse_command(orjson.dumps(seal(takeover, None, T0 + 1))), now=0.0)
    driver.observe("risk", "v2", 1.0, 0.9, t.generation)
    driver.observe("risk", "v1", 1.0, 0.4, t.generation)
    driver.tick(dict(t.rollouts), t.generation, driving=True, now=T0 + 2)
    raw = control.encode_ack(
        command_id="c",
        command="status",
        worker="w-1",
        table=t,
        error=None,
        now=T0 + 2,
        rollout_driver=driver.status(),
    )
    ack = orjson.loads(raw)
    validators["control-ack"].validate(ack)
    assert ack["routing"]["rollouts"]["risk"]["id"] == s.id
    live = ack["rollout_driver"]["rollouts"]["risk"]
    assert live["step"] == 0 and live["evidence"]["versions"]["v2"]["labels"] == 1
    assert live["evidence"]["at_step"] == {"candidate": 1, "incumbent": 1}
    assert live["decision"]["kind"] == "stay"
