"""commands_for: each action against split, sole and shadow routes."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest

from stream_infer.control import parse_command
from stream_infer.online.drift import DriftEvent
from stream_infer.online.policy import POLICY_ACTIONS, Policy, commands_for
from stream_infer.routing import Route

SPLIT = Route(weights=(("v1", 0.9), ("v2", 0.1)))
SOLE = Route.single("v1")
SOLE_WITH_SHADOW = Route.single("v1").with_shadow("v2")
ONLINE_SHADOW = Route.single("v1").with_shadow("online")


def event(version: str, model: str = "risk", signal: str = "error") -> DriftEvent:
    return DriftEvent(model, version, "adwin", signal, 5055, 1.0, 0.5, 320)


def bodies(commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for c in commands:
        assert re.fullmatch(r"drift-[0-9a-f]{32}", c["id"])
    return [{k: v for k, v in c.items() if k != "id"} for c in commands]


def test_alert_sends_nothing() -> None:
    assert commands_for(Policy("error", "alert"), event("v2"), {"risk": SPLIT}) == []


def test_rollback_canary_swaps_a_split_to_its_largest_weight() -> None:
    policy = Policy("error", "rollback_canary")
    got = commands_for(policy, event("v2"), {"risk": SPLIT})
    assert bodies(got) == [{"command": "swap", "model": "risk", "version": "v1"}]
    three = Route(weights=(("v1", 0.3), ("v2", 0.6), ("v3", 0.1)))
    got = commands_for(policy, event("v1"), {"risk": three})
    assert bodies(got) == [{"command": "swap", "model": "risk", "version": "v2"}]


def test_rollback_canary_leaves_the_main_version_of_a_split_alone() -> None:
    policy = Policy("error", "rollback_canary")
    assert commands_for(policy, event("v1"), {"risk": SPLIT}) == []
    even = Route(weights=(("v1", 0.5), ("v2", 0.5)))
    assert commands_for(policy, event("v2"), {"risk": even}) == []


def test_rollback_canary_leaves_a_sole_version_alone() -> None:
    got = commands_for(Policy("error", "rollback_canary"), event("v1"), {"risk": SOLE})
    assert got == []


def test_rollback_canary_never_acts_on_a_shadow_or_an_unrouted_version() -> None:
    policy = Policy("error", "rollback_canary")
    assert commands_for(policy, event("v2"), {"risk": SOLE_WITH_SHADOW}) == []
    assert commands_for(policy, event("v9"), {"risk": SOLE}) == []
    assert commands_for(policy, event("v1", model="fraud"), {"risk": SOLE}) == []


def test_shift_to_online_swaps_to_the_online_version() -> None:
    policy = Policy("error", "shift_to_online", model="risk", online_version="online")
    for route in (SOLE, SPLIT, ONLINE_SHADOW):
        got = commands_for(policy, event("v1"), {"risk": route})
        assert bodies(got) == [{"command": "swap", "model": "risk", "version": "online"}]


def test_shift_to_online_ignores_shadows_and_the_online_version() -> None:
    policy = Policy("error", "shift_to_online", online_version="online")
    assert commands_for(policy, event("online"), {"risk": ONLINE_SHADOW}) == []
    assert commands_for(policy, event("v2"), {"risk": SOLE_WITH_SHADOW}) == []
    assert commands_for(policy, event("online"), {"risk": Route.single("online")}) == []


def test_reset_learner_names_the_online_version() -> None:
    policy = Policy("error", "reset_learner", online_version="online")
    for version in ("online", "v1"):  # the learner as a shadow, or the version it shadows
        got = commands_for(policy, event(version), {"risk": ONLINE_SHADOW})
        assert bodies(got) == [{"command": "reset_learner", "model": "risk", "version": "online"}]


def test_a_policy_acts_only_on_its_signal_and_model() -> None:
    policy = Policy("feature:age", "rollback_canary", model="risk")
    assert commands_for(policy, event("v2"), {"risk": SPLIT}) == []  # signal "error"
    assert commands_for(policy, event("v2", "fraud", "feature:age"), {"fraud": SPLIT}) == []
    assert commands_for(policy, event("v2", "risk", "feature:age"), {"risk": SPLIT}) != []


def test_swap_and_rollback_commands_parse_as_control_commands() -> None:
    policies = [
        Policy("error", "rollback_canary"),
        Policy("error", "shift_to_online", online_version="v2"),
    ]
    for policy, route in zip(policies, (SOLE, SOLE), strict=True):
        for doc in commands_for(policy, event("v1"), {"risk": route}):
            cmd = parse_command(orjson.dumps(doc))
            assert (cmd.id, cmd.command, cmd.model) == (doc["id"], doc["command"], "risk")


def test_invalid_policies() -> None:
    assert POLICY_ACTIONS == ("alert", "rollback_canary", "shift_to_online", "reset_learner")
    with pytest.raises(ValueError, match="action"):
        Policy("error", "page_someone")
    with pytest.raises(ValueError, match="signal"):
        Policy("latency", "alert")
    with pytest.raises(ValueError, match="online_version"):
        Policy("error", "shift_to_online")
    with pytest.raises(ValueError, match="online_version"):
        Policy("error", "reset_learner", online_version="")
    with pytest.raises(ValueError, match="online_version"):
        Policy("error", "alert", online_version="online")
    with pytest.raises(ValueError, match="model"):
        Policy("error", "alert", model="")
