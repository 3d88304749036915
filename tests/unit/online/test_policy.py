"""commands_for: each action against split, sole and shadow routes."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest

from stream_infer.core.control import parse_command
from stream_infer.core.routing import Route
from stream_infer.online import POLICY_ACTIONS
from stream_infer.online.drift import DriftEvent
from stream_infer.online.policy import Policy, commands_for

SPLIT = Route(weights=(("v1", 0.9), ("v2", 0.1)))
SOLE = Route.single("v1")
SOLE_WITH_SHADOW = Route.single("v1").with_shadow("v2")
ONLINE_SHADOW = Route.single("v1").with_shadow("online")


def event(version: str, model: str = "risk", signal: str = "error") -> DriftEvent:
    return DriftEvent(model, version, "adwin", signal, 5055, 1.0, 0.5, 320, previous=0.1)


def bodies(commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for c in commands:
        assert re.fullmatch(r"drift-[0-9a-f]{32}", c["id"])
    return [{k: v for k, v in c.items() if k not in ("id", "if_generation")} for c in commands]


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
    policy = Policy("prediction", "rollback_canary", model="risk")
    assert commands_for(policy, event("v2"), {"risk": SPLIT}) == []  # signal "error"
    assert commands_for(policy, event("v2", "fraud", "prediction"), {"fraud": SPLIT}) == []
    assert commands_for(policy, event("v2", "risk", "prediction"), {"risk": SPLIT}) != []


# --- hardening item 16: feature signals, and ids every worker mints alike ---------------------


def feature_event(name: str = "age") -> DriftEvent:
    """What a feature monitor reports: input drift, of no one model or version."""
    return DriftEvent("*", "*", "adwin", f"feature:{name}", 5055, 1.0, 0.5, 320)


def test_reset_learner_on_input_drift_resets_the_policys_model() -> None:
    # It used to send model "*", which every worker rejected, at every drift, into the log.
    policy = Policy("feature:age", "reset_learner", model="risk", online_version="online")
    got = commands_for(policy, feature_event(), {"risk": ONLINE_SHADOW})
    assert bodies(got) == [{"command": "reset_learner", "model": "risk", "version": "online"}]
    assert commands_for(policy, feature_event("other"), {"risk": ONLINE_SHADOW}) == []


@pytest.mark.parametrize(
    ("action", "fields", "said"),
    [
        ("reset_learner", {"online_version": "online"}, "needs `model`"),
        ("rollback_canary", {"model": "risk"}, "input drift is of no one version"),
        ("shift_to_online", {"model": "risk", "online_version": "online"}, "no one version"),
    ],
)
def test_actions_that_mean_nothing_on_input_drift_are_refused(
    action: str, fields: dict[str, str], said: str
) -> None:
    with pytest.raises(ValueError, match=said):
        Policy("feature:age", action, **fields)


def test_copies_of_a_policy_command_from_several_workers_share_one_id() -> None:
    """Workers that read the control log as far (the same generation) mint the same id, so
    the log keeps one of their copies; after a change (a new generation) the next drift gets a
    new id, so a later action is not mistaken for a copy."""
    policy = Policy("error", "rollback_canary")
    first = commands_for(policy, event("v2"), {"risk": SPLIT}, generation=7)
    again = commands_for(policy, event("v2"), {"risk": SPLIT}, generation=7)
    later = commands_for(policy, event("v2"), {"risk": SPLIT}, generation=8)
    assert first == again
    assert first[0]["id"] != later[0]["id"]
    reset = Policy("error", "reset_learner", online_version="online")
    ids = {
        commands_for(reset, event("v1"), {"risk": ONLINE_SHADOW}, generation=7)[0]["id"],
        first[0]["id"],
    }
    assert len(ids) == 2  # another command at the same generation: another id


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


def test_an_error_that_fell_is_only_an_alert() -> None:
    """A freshly reset learner's error falls as it learns, and ADWIN alarms on that too: acting
    on it reset the learner again and again (27 resets for one real drift in review)."""
    fell = DriftEvent("risk", "online", "adwin", "error", 5055, 1.0, 0.1, 320, previous=0.5)
    unknown = DriftEvent("risk", "v2", "adwin", "error", 5055, 1.0, 0.5, 320)
    reset = Policy("error", "reset_learner", online_version="online")
    assert commands_for(reset, fell, {"risk": ONLINE_SHADOW}) == []
    assert commands_for(Policy("error", "rollback_canary"), unknown, {"risk": SPLIT}) == []
    prediction = DriftEvent("risk", "v2", "adwin", "prediction", 5, 1.0, 0.1, 320, previous=0.5)
    assert commands_for(Policy("prediction", "rollback_canary"), prediction, {"risk": SPLIT})


def test_a_policy_command_applies_only_at_the_generation_it_was_computed_from() -> None:
    """A late copy, or one from a worker that had not read as far, is stale: it must not undo
    the operator's newer command."""
    from stream_infer.core.control import STALE, RoutingTable
    from stream_infer.errors import ControlError

    table = RoutingTable.initial({"risk": ("v1", "v2", "v3")}, {"risk": "v1"}, 0.0)
    split = parse_command(
        orjson.dumps(
            {"id": "op-1", "command": "split", "model": "risk", "weights": {"v1": 0.9, "v2": 0.1}}
        )
    )
    table.apply(split, 0.0)
    (doc,) = commands_for(
        Policy("error", "rollback_canary"),
        event("v2"),
        {"risk": table.routes["risk"]},
        generation=table.generation,
    )
    operator = parse_command(
        orjson.dumps({"id": "op-2", "command": "swap", "model": "risk", "version": "v3"})
    )
    table.apply(operator, 0.0)
    with pytest.raises(ControlError) as info:
        table.apply(parse_command(orjson.dumps(doc)), 0.0)
    assert info.value.reason == STALE
    assert table.routes["risk"] == Route.single("v3")
