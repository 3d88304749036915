"""A rollout's driver across rebalances (the second review of issue 17): an eager rebalance
revokes partition 0 and gives it back, which must not begin a new driving session (a takeover
restarts the step's clock and spends a smaller share of alpha); a takeover the log refused is
sent again under a new id; drivers replaced again and again cannot keep a step from timing out.
"""

from __future__ import annotations

from typing import Any

import orjson

from stream_infer.core.control import parse_command, seal
from stream_infer.online.rollout import RolloutDriver
from tests.unit.test_rollout_review import PLAN, T0, _feed, _Log

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
    takeover came after it), so A takes over as the third session."""
    log, a, b = _Log(SLOW), RolloutDriver("a"), RolloutDriver("b")
    assert _tick(log, a, T0 + 1) == ["takeover"]
    assert _tick(log, a, T0 + 2, driving=False) == []
    assert _tick(log, b, T0 + 3) == ["takeover"]
    assert _tick(log, b, T0 + 4) == []
    assert _tick(log, b, T0 + 5, driving=False) == []
    assert _tick(log, a, T0 + 6) == ["takeover"]
    assert log.table.rollouts["risk"].sessions == 3
    assert a.status()["rollouts"]["risk"]["evidence"]["session"] == 3


def test_two_drivers_without_a_break_keep_their_sessions() -> None:
    """A split-brain window (both think they own partition 0, neither stopped driving): each
    keeps its session instead of taking over from the other in turn."""
    log, a, b = _Log(SLOW), RolloutDriver("a"), RolloutDriver("b")
    for t in range(1, 12):
        _tick(log, a, T0 + t)
        _tick(log, b, T0 + t + 0.5)
    assert _decisions(log) == ["start", "takeover", "takeover"]


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
    for i, t in enumerate(range(1, 80, 4)):
        driver = RolloutDriver(f"d{i}")
        decided += _tick(log, driver, T0 + t)
        decided += _tick(log, driver, T0 + t + 2)
        if "hold" in decided:
            break
    record = log.table.rollouts["risk"]
    assert "hold" in decided and record.held
    hold = next(d for d in record.decisions if d["decision"] == "hold")
    assert hold["at"] <= T0 + 2 * 30 + 4, hold
    assert record.step_started_at <= T0 + 30
