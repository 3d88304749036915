"""A rollout's driver across rebalances (the second review of issue 17): an eager rebalance
revokes partition 0 and gives it back, which must not begin a new driving session (a takeover
restarts the step's clock and spends a smaller share of alpha); a takeover the log refused is
sent again under a new id; drivers replaced again and again cannot keep a step from timing out.
"""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest

from stream_infer.core.control import RoutingTable, parse_command, seal
from stream_infer.errors import ControlError
from stream_infer.online.rollout import RolloutDriver
from tests.unit.test_rollout_review import DECLARED, PLAN, T0, _feed, _Log

SLOW = PLAN | {"min_labels": 500, "max_duration_s": 30, "on_timeout": "hold"}


def _tick(log: _Log, driver: RolloutDriver, now: float, *, driving: bool = True) -> list[str]:
    table = log.table
    docs = driver.tick(dict(table.rollouts), table.generation, driving=driving, now=now)
    for doc in docs:
        table.apply(parse_command(orjson.dumps(seal(doc, None, now))), now)
    return [str(d["rollout"]["decision"]) for d in docs]


def _decisions(log: _Log) -> list[str]:
    return [str(d["decision"]) for d in log.table.rollouts["risk"].decisions]


def test_partition_0_revoked_and_given_back_within_the_grace_keeps_the_session() -> None:
    log, driver = _Log(SLOW), RolloutDriver("a", grace_s=60)
    assert _tick(log, driver, T0 + 1) == ["takeover"]
    for t in range(2, 10):
        _feed(driver, 10, seed=t)
        assert _tick(log, driver, T0 + t) == []
    # an eager rebalance: every partition revoked for a few ticks, then assigned again
    for t in range(10, 14):
        _feed(driver, 10, seed=t)  # labels joined meanwhile are kept for the session
        assert _tick(log, driver, T0 + t, driving=False) == []
        assert driver.status() == {"driving": False, "rollouts": {}}
    assert _tick(log, driver, T0 + 14) == []  # no second takeover
    record = log.table.rollouts["risk"]
    assert record.sessions == 1 and record.step_started_at == T0 + 1
    assert _decisions(log) == ["start", "takeover"]
    live = driver.status()["rollouts"]["risk"]["evidence"]
    assert live["session"] == 1 and live["at_step"] == {"candidate": 120, "incumbent": 120}
    for t in range(15, 31):
        assert _tick(log, driver, T0 + t) == []
    assert _tick(log, driver, T0 + 31) == ["hold"]  # the first session's clock: 30 s


def test_partition_0_back_after_the_grace_is_a_new_session() -> None:
    log, driver = _Log(SLOW), RolloutDriver("a", grace_s=5)
    assert _tick(log, driver, T0 + 1) == ["takeover"]
    for t in range(2, 9):
        assert _tick(log, driver, T0 + t, driving=False) == []
    assert _tick(log, driver, T0 + 9) == ["takeover"]
    assert log.table.rollouts["risk"].sessions == 2


def test_another_drivers_takeover_during_the_break_ends_the_session() -> None:
    """A loses partition 0, B drives meanwhile, A gets it back: A's old session is over (B's
    takeover came after it), so A takes over as the third session, after waiting resend_s.
    B itself waits resend_s after A's takeover: A may still drive."""
    log, a, b = _Log(SLOW), RolloutDriver("a", resend_s=10), RolloutDriver("b", resend_s=10)
    assert _tick(log, a, T0 + 1) == ["takeover"]
    assert _tick(log, a, T0 + 2, driving=False) == []
    assert _tick(log, b, T0 + 3) == []  # first look: A's takeover, waits resend_s
    assert b.status()["rollouts"]["risk"]["yielding_until"] == T0 + 13
    assert _tick(log, b, T0 + 13) == ["takeover"]
    assert _tick(log, b, T0 + 14) == []
    assert _tick(log, b, T0 + 15, driving=False) == []
    assert _tick(log, a, T0 + 16) == []  # sees B's: waits resend_s from now
    assert _tick(log, a, T0 + 25) == []
    assert _tick(log, a, T0 + 26) == ["takeover"]
    assert log.table.rollouts["risk"].sessions == 3
    assert a.status()["rollouts"]["risk"]["evidence"]["session"] == 3


def test_two_drivers_at_once_take_over_from_each_other_at_most_once_per_resend() -> None:
    """A split-brain window (both think they own partition 0): no driver takes over within
    resend_s of another's takeover, so the two take over from each other at most once per
    resend_s, never every tick; each session number belongs to one driver."""
    log, a, b = _Log(SLOW), RolloutDriver("a", resend_s=10), RolloutDriver("b", resend_s=10)
    owners: dict[int, set[str]] = {}
    for t in range(1, 61):
        for name, driver in (("a", a), ("b", b)):
            _tick(log, driver, T0 + t + (0.5 if name == "b" else 0.0))
            live = driver.status()["rollouts"]["risk"]["evidence"]["session"]
            owners.setdefault(live, set()).add(name)
    takeovers = _decisions(log).count("takeover")
    assert 2 <= takeovers <= 1 + 60 // 10, _decisions(log)
    times = [d["at"] for d in log.table.rollouts["risk"].decisions if d["decision"] == "takeover"]
    assert all(b - a >= 10 for a, b in itertools.pairwise(times)), times
    assert log.table.rollouts["risk"].sessions == takeovers
    applied = range(1, takeovers + 1)
    assert all(len(owners.get(k, set())) == 1 for k in applied), owners


def test_another_drivers_takeover_landing_after_the_return_ends_the_session() -> None:
    """The review's case: A comes back within the grace and goes on; a takeover B sent during
    the break lands afterwards. A's session is over (it never runs a fresh sequence at its old
    level): it waits, then takes over as the third session."""
    log, a, b = _Log(SLOW), RolloutDriver("a", resend_s=10), RolloutDriver("b")
    assert _tick(log, a, T0 + 1) == ["takeover"]
    for t in range(2, 13):
        _feed(a, 10, seed=t)
        assert _tick(log, a, T0 + t) == []
    assert _tick(log, a, T0 + 13, driving=False) == []
    table = log.table
    assert b.tick(dict(table.rollouts), table.generation, driving=True, now=T0 + 3) == []
    in_flight = b.tick(dict(table.rollouts), table.generation, driving=True, now=T0 + 14)
    assert [d["action"] for d in in_flight] == ["takeover"]
    assert _tick(log, a, T0 + 15) == []  # back: its session goes on
    assert a.status()["rollouts"]["risk"]["evidence"]["session"] == 1
    table.apply(parse_command(orjson.dumps(seal(in_flight[0], None, T0 + 14))), T0 + 15.5)
    assert table.rollouts["risk"].sessions == 2
    for t in range(16, 26):
        assert _tick(log, a, T0 + t) == [], t  # over, and waiting resend_s after it saw B's
        live = a.status()["rollouts"]["risk"]
        assert live["evidence"]["session"] == 3 and not live["active"]
        assert live["yielding_until"] == T0 + 26
    assert _tick(log, a, T0 + 26) == ["takeover"]
    assert table.rollouts["risk"].sessions == 3


def test_an_operators_resume_does_not_revive_a_session_another_driver_ended() -> None:
    """A drives, loses partition 0; B takes over and holds on the step's timeout; an operator
    resumes; A comes back within the grace: B's takeover ended A's session."""
    log, a, b = _Log(SLOW), RolloutDriver("a", resend_s=2), RolloutDriver("b")
    assert _tick(log, a, T0 + 1) == ["takeover"]
    assert _tick(log, a, T0 + 2, driving=False) == []
    assert _tick(log, b, T0 + 3) == []  # first look: waits resend_s (10)
    assert _tick(log, b, T0 + 13) == ["takeover"]
    assert _tick(log, b, T0 + 50) == ["hold"]
    assert _tick(log, b, T0 + 51, driving=False) == []
    resume = {"id": "op-resume", "command": "rollout", "model": "risk", "action": "resume"}
    log.table.apply(parse_command(orjson.dumps(seal(resume, None, T0 + 52))), T0 + 52)
    assert _tick(log, a, T0 + 53) == []  # over: B's takeover ended it; A waits its resend_s
    assert _tick(log, a, T0 + 55) == ["takeover"]
    assert log.table.rollouts["risk"].sessions == 3


def test_a_refused_takeover_is_sent_again_under_a_new_id() -> None:
    """The log refused the takeover at an unchanged generation (here: its id was taken): the
    driver's resend is a new id, not a duplicate refused forever."""
    log, driver = _Log(SLOW), RolloutDriver("a", resend_s=5)
    table = log.table
    first: list[dict[str, Any]] = driver.tick(
        dict(table.rollouts), table.generation, driving=True, now=T0 + 1
    )
    assert [d["action"] for d in first] == ["takeover"]
    table.seen.add(str(first[0]["id"]))  # as if refused: the id is spent
    assert _tick(log, driver, T0 + 3) == []  # waiting for it
    again = driver.tick(dict(table.rollouts), table.generation, driving=True, now=T0 + 7)
    assert [d["action"] for d in again] == ["takeover"] and again[0]["id"] != first[0]["id"]
    table.apply(parse_command(orjson.dumps(seal(again[0], None, T0 + 7))), T0 + 7)
    assert table.rollouts["risk"].sessions == 1
    assert _tick(log, driver, T0 + 8) == []
    assert driver.status()["rollouts"]["risk"]["evidence"]["session"] == 1


def test_drivers_replaced_again_and_again_cannot_keep_a_step_from_timing_out() -> None:
    """Each takeover restarts the step's clock, but never past one more max_duration after the
    step began: the step (30 s) holds by 60 s however often its driver is replaced."""
    log = _Log(SLOW)
    decided: list[str] = []
    for i, t in enumerate(range(1, 200, 12)):
        driver = RolloutDriver(f"d{i}")
        decided += _tick(log, driver, T0 + t)  # the first takes over, the others wait
        decided += _tick(log, driver, T0 + t + 10)
        decided += _tick(log, driver, T0 + t + 11)
        if "hold" in decided:
            break
    record = log.table.rollouts["risk"]
    assert "hold" in decided and record.held
    assert decided.count("takeover") >= 4
    hold = next(d for d in record.decisions if d["decision"] == "hold")
    assert hold["at"] <= T0 + 2 * 30 + 1, hold
    assert record.step_started_at <= T0 + 30


def test_the_takeover_cap_counts_from_a_resume_and_replays_the_same() -> None:
    """An operator's resume starts the step's clock again and moves the cap's origin; a second
    table replaying the same log holds the same record."""
    begin = {"id": "r-1", "command": "rollout", "model": "risk", "version": "v2", "plan": SLOW}
    docs: list[dict[str, Any]] = [seal(begin, None, T0)]
    table = RoutingTable.initial(DECLARED, {"risk": "v1"}, now=T0)
    table.apply(parse_command(orjson.dumps(docs[0])), T0)

    def tick(driver: RolloutDriver, now: float) -> list[str]:
        out = driver.tick(dict(table.rollouts), table.generation, driving=True, now=now)
        for doc in out:
            docs.append(seal(doc, None, now))
            table.apply(parse_command(orjson.dumps(docs[-1])), now)
        return [str(d["rollout"]["decision"]) for d in out]

    assert tick(RolloutDriver("a"), T0 + 1) == ["takeover"]
    held = RolloutDriver("b")
    assert tick(held, T0 + 2) == []  # first look: waits resend_s
    assert tick(held, T0 + 12) == ["takeover"]
    assert tick(held, T0 + 45) == ["hold"]
    resume = {"id": "op-resume", "command": "rollout", "model": "risk", "action": "resume"}
    docs.append(seal(resume, None, T0 + 100))
    table.apply(parse_command(orjson.dumps(docs[-1])), T0 + 100)
    c, d = RolloutDriver("c"), RolloutDriver("d")
    assert tick(c, T0 + 100) == [] and tick(c, T0 + 110) == ["takeover"]
    assert table.rollouts["risk"].step_started_at == T0 + 110
    assert tick(d, T0 + 140) == [] and tick(d, T0 + 150) == ["takeover"]
    record = table.rollouts["risk"]
    assert record.step_clock_origin == T0 + 100 and record.step_started_at == T0 + 130
    replayed = RoutingTable.initial(DECLARED, {"risk": "v1"}, now=T0 + 500)
    for doc in docs:
        replayed.apply(parse_command(orjson.dumps(doc)), T0 + 999)
    assert replayed.rollouts["risk"].as_dict() == record.as_dict()


def test_a_takeover_that_lands_after_its_resend_begins_the_session() -> None:
    """The log is slow: the first takeover is not applied within resend_s, the driver sends
    another (a new id at the same generation); the first lands, the resend is stale. The first
    one is the driver's session: it does not take over again, and it decides."""
    log, driver = _Log(PLAN), RolloutDriver("a", resend_s=5)
    table = log.table
    first = driver.tick(dict(table.rollouts), table.generation, driving=True, now=T0 + 1)
    resent = driver.tick(dict(table.rollouts), table.generation, driving=True, now=T0 + 7)
    assert [d["action"] for d in first + resent] == ["takeover", "takeover"]
    assert first[0]["id"] != resent[0]["id"]
    table.apply(parse_command(orjson.dumps(seal(first[0], None, T0 + 1))), T0 + 8)
    with pytest.raises(ControlError):  # stale: decided at the generation the first moved
        table.apply(parse_command(orjson.dumps(seal(resent[0], None, T0 + 7))), T0 + 8)
    _feed(driver, 300, seed=3)
    decided = _tick(log, driver, T0 + 9)
    assert "takeover" not in decided and table.rollouts["risk"].sessions == 1
    live = driver.status()["rollouts"]["risk"]
    assert live["active"] and live["evidence"]["session"] == 1


def test_two_drivers_with_the_same_name_never_both_take_the_same_session() -> None:
    """Two workers named alike (a fixed hostname, pid 1 in containers) tick at the same
    generation: their takeovers differ (each driver's nonce), the log applies one, and no
    session number is ever active on both."""
    log, a, b = _Log(SLOW), RolloutDriver("w"), RolloutDriver("w")
    table = log.table
    docs = [
        d.tick(dict(table.rollouts), table.generation, driving=True, now=T0 + 1) for d in (a, b)
    ]
    assert docs[0][0]["id"] != docs[1][0]["id"]
    table.apply(parse_command(orjson.dumps(seal(docs[0][0], None, T0 + 1))), T0 + 1)
    with pytest.raises(ControlError):  # stale: the first moved the generation
        table.apply(parse_command(orjson.dumps(seal(docs[1][0], None, T0 + 1))), T0 + 1)
    active: dict[int, set[int]] = {}
    for t in range(2, 40):
        for i, driver in enumerate((a, b)):
            _tick(log, driver, T0 + t)
            live = driver.status()["rollouts"]["risk"]
            if live["active"]:
                active.setdefault(live["evidence"]["session"], set()).add(i)
    assert active and all(len(who) == 1 for who in active.values()), active
    assert 1 in active and active[1] == {0}  # the first takeover was a's


def test_the_driver_whose_takeover_loses_a_race_waits_before_taking_over() -> None:
    """The third review's case: two drivers without a session send takeovers at one
    generation; A's lands, B's is stale. B does not take over a tick later: it waits until
    resend_s after A's."""
    log, a, b = _Log(SLOW), RolloutDriver("a"), RolloutDriver("b", resend_s=10)
    table = log.table
    docs = [
        d.tick(dict(table.rollouts), table.generation, driving=True, now=T0 + 1) for d in (a, b)
    ]
    table.apply(parse_command(orjson.dumps(seal(docs[0][0], None, T0 + 1))), T0 + 1)
    with pytest.raises(ControlError):
        table.apply(parse_command(orjson.dumps(seal(docs[1][0], None, T0 + 1))), T0 + 1)
    for t in range(2, 12):
        assert _tick(log, b, T0 + t + 0.5) == [], t  # B saw A's at T0 + 2.5
    assert _tick(log, b, T0 + 12.5) == ["takeover"]


def test_a_driver_whose_clock_is_behind_does_not_make_the_other_take_over_at_once() -> None:
    """The fourth review's case: B's clock runs 100 s behind A's. B's takeover looks 100 s old
    to A by its time in the log, but A saw it appear: A waits resend_s from then. Takeovers stay
    resend_s apart in real time."""
    log, a, b = _Log(SLOW), RolloutDriver("a", resend_s=10), RolloutDriver("b", resend_s=10)
    taken: list[float] = []
    for step in range(0, 120):
        t = 1 + step * 0.5
        driver, clock = (a, t) if step % 2 == 0 else (b, t - 100)
        if _tick(log, driver, T0 + clock) == ["takeover"]:
            taken.append(t)
    assert len(taken) >= 2, taken
    assert all(y - x >= 9.5 for x, y in itertools.pairwise(taken)), taken
