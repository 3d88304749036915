"""The control plane without a broker: parsing and authenticating commands, the routing table
they change (plan, commit, history), acks, the JSON Schemas of commands and acks, and the
usage errors of ``stream-infer control``."""

from __future__ import annotations

import copy
import hashlib
import hmac
import itertools
import json
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner
from jsonschema import Draft202012Validator

from stream_infer.cli import cli
from stream_infer.core import control
from stream_infer.core.control import (
    MAX_COMMAND_BYTES,
    Command,
    RoutingTable,
    canonical,
    derived_command_id,
    encode_ack,
    new_command_id,
    parse_command,
    required_versions,
    sign,
)
from stream_infer.core.routing import Route
from stream_infer.errors import ControlError
from stream_infer.io.controller import new_command
from stream_infer.online.drift import DriftEvent
from stream_infer.online.policy import Policy, commands_for

ROOT = Path(__file__).resolve().parents[2]
TOPOLOGY = ROOT / "topologies" / "phishing.yaml"
SCHEMA_NAMES = ("control-command", "control-ack")
KEY = b"s3cret-key"
DECLARED = {"risk": ("v1", "v2", "v3"), "spam": ("a", "b")}
SERVING = {"risk": "v1", "spam": "a"}
T0 = 1_700_000_000.0

# Every rejection reason control.py defines: its upper-case string constants but COMMANDS.
REASONS = {v for k, v in vars(control).items() if k.isupper() and isinstance(v, str)}


def raw(doc: Any) -> bytes:
    return orjson.dumps(doc)


def signed(doc: dict[str, Any], key: bytes = KEY) -> dict[str, Any]:
    return doc | {"signature": sign(doc, key)}


def rejection(data: bytes | None, *, hmac_key: bytes | None = None) -> ControlError:
    with pytest.raises(ControlError) as info:
        parse_command(data, hmac_key=hmac_key)
    assert info.value.detail, "a rejection says why"
    return info.value


def fresh_table() -> RoutingTable:
    return RoutingTable.initial(DECLARED, SERVING, now=T0)


def apply(table: RoutingTable, cmd: Command, now: float) -> None:
    table.commit(cmd, table.plan(cmd), now)


def snapshot(table: RoutingTable) -> tuple[Any, ...]:
    return (
        dict(table.routes),
        copy.deepcopy(table.history),
        table.changed_at,
        table.applied,
        dict(table.declared),
    )


_IDS = itertools.count()


def swap(version: str, model: str = "risk") -> Command:
    return Command(f"c-swap-{next(_IDS)}", "swap", model, version)


def split(weights: dict[str, float], model: str = "risk") -> Command:
    return Command(f"c-split-{next(_IDS)}", "split", model, weights=weights)


def shadow(version: str | None, model: str = "risk") -> Command:
    return Command(f"c-shadow-{next(_IDS)}", "shadow", model, version)


UNSHADOW = Command("c-unshadow", "unshadow", "risk")
ROLLBACK = Command("c-rollback", "rollback", "risk")


def rollback() -> Command:
    """A rollback with an id of its own (an id is applied once)."""
    return Command(f"c-rollback-{next(_IDS)}", "rollback", "risk")


STATUS = Command("c-status", "status")
RESET = Command("c-reset", "reset_learner", "risk", "v2")


# --- the schemas themselves -----------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_each_control_schema_is_valid_and_documented(name: str) -> None:
    schema = json.loads((ROOT / "schemas" / f"{name}.schema.json").read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"urn:stream-infer:schema:{name}"
    assert schema["title"]
    assert schema["description"]
    undocumented = [k for k, v in schema["properties"].items() if not v.get("description")]
    assert undocumented == []
    assert set(schema["required"]) <= set(schema["properties"])


def test_the_command_schema_names_the_code_commands(
    validators: dict[str, Draft202012Validator],
) -> None:
    schema = validators["control-command"].schema
    assert schema["properties"]["command"]["enum"] == list(control.COMMANDS)
    branches = [b["properties"]["command"]["const"] for b in schema["oneOf"]]
    assert branches == list(control.COMMANDS)
    assert str(MAX_COMMAND_BYTES) in schema["description"]


def test_the_ack_reasons_are_the_code_reasons(validators: dict[str, Draft202012Validator]) -> None:
    assert {control.MALFORMED, control.ARTIFACT_INVALID} < REASONS  # the introspection works
    schema = validators["control-ack"].schema
    assert set(schema["properties"]["reason"]["enum"]) == REASONS
    for reason in REASONS:
        assert f"`{reason}`" in schema["description"], f"{reason} is not documented"
    command_enum = schema["properties"]["command"]["enum"]
    assert command_enum == [*control.COMMANDS, None]


# --- parse_command: good commands -----------------------------------------------------------

GOOD_COMMANDS = [
    (
        {"id": "c1", "command": "swap", "model": "risk", "version": "v2"},
        Command("c1", "swap", "risk", "v2"),
    ),
    (
        {"id": "c2", "command": "split", "model": "risk", "weights": {"v1": 0.9, "v2": 0.1}},
        Command("c2", "split", "risk", weights={"v1": 0.9, "v2": 0.1}),
    ),
    (
        {"id": "c2i", "command": "split", "model": "risk", "weights": {"v1": 1, "v2": 0}},
        Command("c2i", "split", "risk", weights={"v1": 1.0, "v2": 0.0}),
    ),
    (
        {"id": "c3", "command": "shadow", "model": "risk", "version": "v2"},
        Command("c3", "shadow", "risk", "v2"),
    ),
    (
        {"id": "c3n", "command": "shadow", "model": "risk", "version": None},
        Command("c3n", "shadow", "risk", None),
    ),
    ({"id": "c3a", "command": "shadow", "model": "risk"}, Command("c3a", "shadow", "risk")),
    ({"id": "c4", "command": "unshadow", "model": "risk"}, Command("c4", "unshadow", "risk")),
    ({"id": "c5", "command": "rollback", "model": "risk"}, Command("c5", "rollback", "risk")),
    ({"id": "c6", "command": "status"}, Command("c6", "status")),
    # Fields a command does not use are ignored, by the parser and by the schema.
    ({"id": "c7", "command": "status", "model": 7, "note": "hi"}, Command("c7", "status")),
    (
        {"id": "c8", "command": "swap", "model": "risk", "version": "v2", "weights": "x"},
        Command("c8", "swap", "risk", "v2"),
    ),
    (
        {"id": "c9", "command": "rollback", "model": "risk", "version": 3},
        Command("c9", "rollback", "risk"),
    ),
    (
        {"id": "c10", "command": "reset_learner", "model": "risk", "version": "v2"},
        Command("c10", "reset_learner", "risk", "v2"),
    ),
]


@pytest.mark.parametrize(
    ("doc", "expected"), GOOD_COMMANDS, ids=[d["id"] for d, _ in GOOD_COMMANDS]
)
def test_good_commands_parse_and_validate(
    validators: dict[str, Draft202012Validator], doc: dict[str, Any], expected: Command
) -> None:
    cmd = parse_command(raw(doc))
    assert cmd == expected
    if cmd.weights is not None:
        assert all(type(w) is float for w in cmd.weights.values())
    validators["control-command"].validate(doc)


def test_a_command_of_exactly_the_size_limit_is_accepted() -> None:
    doc = {"id": "c", "command": "status", "pad": ""}
    doc["pad"] = "x" * (MAX_COMMAND_BYTES - len(raw(doc)))
    assert len(raw(doc)) == MAX_COMMAND_BYTES
    assert parse_command(raw(doc)) == Command("c", "status")
    doc["pad"] += "x"
    error = rejection(raw(doc))
    assert error.reason == control.MALFORMED
    assert str(MAX_COMMAND_BYTES + 1) in error.detail


def test_new_command_makes_a_fresh_id_and_a_valid_command(
    validators: dict[str, Draft202012Validator],
) -> None:
    docs = [
        new_command("swap", model="risk", version="v2"),
        new_command("split", model="risk", weights={"v1": 0.5, "v2": 0.5}),
        new_command("shadow", model="risk", version=None),
        new_command("unshadow", model="risk"),
        new_command("rollback", model="risk"),
        new_command("status"),
        new_command("reset_learner", model="risk", version="v2"),
    ]
    assert len({d["id"] for d in docs}) == len(docs)
    for doc in docs:
        assert re.fullmatch(r"cmd-[0-9a-f]{12}", doc["id"]), doc["id"]
        validators["control-command"].validate(doc)
        cmd = parse_command(raw(doc))
        assert (cmd.id, cmd.command) == (doc["id"], doc["command"])
    assert list(docs[0]) == ["id", "command", "model", "version"]
    assert parse_command(raw(docs[1])).weights == {"v1": 0.5, "v2": 0.5}


def test_a_drift_policy_command_id_is_the_one_derived_from_its_body_and_generation() -> None:
    # Workers of different releases must mint the same id for the same command: pinned.
    split = {"risk": Route(weights=(("v1", 0.9), ("v2", 0.1)))}
    event = DriftEvent("risk", "v2", "adwin", "error", 5055, 1.0, 0.5, 320, previous=0.1)
    (sent,) = commands_for(Policy("error", "rollback_canary"), event, split, generation=3)
    body = {k: v for k, v in sent.items() if k != "id"}
    assert sent["id"] == derived_command_id(body, 3) == "drift-169b2f134d21c04ecb4d042df20e8771"
    assert derived_command_id(body, 4) != sent["id"]
    assert len(sent["id"]) <= control.MAX_ID_CHARS and len(new_command_id()) <= control.MAX_ID_CHARS


# --- parse_command: rejections --------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        None,
        b"",
        b"x" * (MAX_COMMAND_BYTES + 1),
        b'{"id": "c", "command": "status"',
        b"\xff\xfe",
        b"{'id': 'c'}",
        b'{"id": "c", "command": "split", "model": "risk", "weights": {"v1": NaN}}',
        b'{"id": "c", "command": "split", "model": "risk", "weights": {"v1": Infinity}}',
        b'{"id": "c", "command": "split", "model": "risk", "weights": {"v1": 1e999}}',
    ],
    ids=["none", "empty", "too big", "truncated", "not utf-8", "quotes", "NaN", "Inf", "1e999"],
)
def test_bytes_that_are_not_a_json_command_are_malformed(data: bytes | None) -> None:
    error = rejection(data)
    assert error.reason == control.MALFORMED
    assert error.command_id is None


BAD_COMMANDS = [
    # (test id, document, reason, command_id the error keeps)
    ("array", [{"id": "c", "command": "status"}], control.MALFORMED, None),
    ("string", "status", control.MALFORMED, None),
    ("number", 5, control.MALFORMED, None),
    ("null", None, control.MALFORMED, None),
    ("missing id", {"command": "status"}, control.MALFORMED, None),
    ("empty id", {"id": "", "command": "status"}, control.MALFORMED, None),
    ("int id", {"id": 1, "command": "status"}, control.MALFORMED, None),
    ("null id", {"id": None, "command": "status"}, control.MALFORMED, None),
    ("swap no model", {"id": "c", "command": "swap", "version": "v2"}, control.MALFORMED, "c"),
    (
        "swap empty model",
        {"id": "c", "command": "swap", "model": "", "version": "v2"},
        control.MALFORMED,
        "c",
    ),
    (
        "split int model",
        {"id": "c", "command": "split", "model": 1, "weights": {"v1": 1}},
        control.MALFORMED,
        "c",
    ),
    ("shadow no model", {"id": "c", "command": "shadow", "version": "v2"}, control.MALFORMED, "c"),
    ("unshadow no model", {"id": "c", "command": "unshadow"}, control.MALFORMED, "c"),
    (
        "reset_learner no model",
        {"id": "c", "command": "reset_learner", "version": "v2"},
        control.MALFORMED,
        "c",
    ),
    (
        "reset_learner no version",
        {"id": "c", "command": "reset_learner", "model": "risk"},
        control.MALFORMED,
        "c",
    ),
    (
        "rollback null model",
        {"id": "c", "command": "rollback", "model": None},
        control.MALFORMED,
        "c",
    ),
    ("swap no version", {"id": "c", "command": "swap", "model": "risk"}, control.MALFORMED, "c"),
    (
        "swap null version",
        {"id": "c", "command": "swap", "model": "risk", "version": None},
        control.MALFORMED,
        "c",
    ),
    (
        "swap empty version",
        {"id": "c", "command": "swap", "model": "risk", "version": ""},
        control.MALFORMED,
        "c",
    ),
    (
        "shadow empty version",
        {"id": "c", "command": "shadow", "model": "risk", "version": ""},
        control.MALFORMED,
        "c",
    ),
    (
        "shadow int version",
        {"id": "c", "command": "shadow", "model": "risk", "version": 2},
        control.MALFORMED,
        "c",
    ),
    ("no command", {"id": "c", "model": "risk"}, control.UNKNOWN_COMMAND, "c"),
    ("unknown command", {"id": "c", "command": "delete"}, control.UNKNOWN_COMMAND, "c"),
    ("upper-case command", {"id": "c", "command": "STATUS"}, control.UNKNOWN_COMMAND, "c"),
    ("list command", {"id": "c", "command": ["status"]}, control.UNKNOWN_COMMAND, "c"),
    ("no weights", {"id": "c", "command": "split", "model": "risk"}, control.INVALID_WEIGHTS, "c"),
    (
        "weights a list",
        {"id": "c", "command": "split", "model": "risk", "weights": [["v1", 1]]},
        control.INVALID_WEIGHTS,
        "c",
    ),
    (
        "weights a string",
        {"id": "c", "command": "split", "model": "risk", "weights": "v1=1"},
        control.INVALID_WEIGHTS,
        "c",
    ),
    (
        "weights empty",
        {"id": "c", "command": "split", "model": "risk", "weights": {}},
        control.INVALID_WEIGHTS,
        "c",
    ),
    (
        "weight a string",
        {"id": "c", "command": "split", "model": "risk", "weights": {"v1": "1"}},
        control.INVALID_WEIGHTS,
        "c",
    ),
    (
        "weight a bool",
        {"id": "c", "command": "split", "model": "risk", "weights": {"v1": True}},
        control.INVALID_WEIGHTS,
        "c",
    ),
    (
        "weight null",
        {"id": "c", "command": "split", "model": "risk", "weights": {"v1": 1, "v2": None}},
        control.INVALID_WEIGHTS,
        "c",
    ),
    (
        "weight NaN string",
        {"id": "c", "command": "split", "model": "risk", "weights": {"v1": "NaN"}},
        control.INVALID_WEIGHTS,
        "c",
    ),
    (
        "weight a list",
        {"id": "c", "command": "split", "model": "risk", "weights": {"v1": [1]}},
        control.INVALID_WEIGHTS,
        "c",
    ),
]


@pytest.mark.parametrize(
    ("doc", "reason", "command_id"), [c[1:] for c in BAD_COMMANDS], ids=[c[0] for c in BAD_COMMANDS]
)
def test_bad_commands_are_rejected_and_fail_the_schema(
    validators: dict[str, Draft202012Validator], doc: Any, reason: str, command_id: str | None
) -> None:
    error = rejection(raw(doc))
    assert (error.reason, error.command_id) == (reason, command_id)
    assert str(error) == f"{reason}: {error.detail}"
    assert not validators["control-command"].is_valid(doc)


def test_a_rejection_names_the_field_and_what_arrived() -> None:
    error = rejection(raw({"id": "c", "command": "swap", "model": "risk", "version": 2}))
    assert "'version'" in error.detail
    assert "2" in error.detail
    error = rejection(raw({"id": "c", "command": "split", "model": "m", "weights": {"v9": "x"}}))
    assert "'v9'" in error.detail
    assert "'x'" in error.detail
    error = rejection(raw({"id": "c", "command": "reboot"}))
    assert "'reboot'" in error.detail
    assert all(name in error.detail for name in control.COMMANDS)


# --- signatures -----------------------------------------------------------------------------

SPLIT_DOC = {
    "id": "c-sig",
    "command": "split",
    "model": "risk",
    "weights": {"v1": 0.75, "v2": 0.25},
    "note": "extra fields are signed too",
}


def test_canonical_json_sorts_keys_drops_the_signature_and_has_no_whitespace() -> None:
    doc = {"signature": "ab", "weights": {"v2": 0.25, "v1": 0.75}, "id": "c", "n": None, "t": "é"}
    expected = '{"id":"c","n":null,"t":"é","weights":{"v1":0.75,"v2":0.25}}'.encode()
    assert canonical(doc) == expected
    assert sign(doc, KEY) == hmac.new(KEY, expected, hashlib.sha256).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", sign(doc, KEY))
    assert sign(doc, KEY) != sign(doc, KEY + b"!")


def test_a_good_signature_is_accepted_and_validates(
    validators: dict[str, Draft202012Validator],
) -> None:
    doc = signed(SPLIT_DOC)
    cmd = parse_command(raw(doc), hmac_key=KEY)
    assert cmd == Command("c-sig", "split", "risk", weights={"v1": 0.75, "v2": 0.25})
    validators["control-command"].validate(doc)
    status = signed({"id": "s", "command": "status"})
    assert parse_command(raw(status), hmac_key=KEY) == Command("s", "status")


def test_a_key_requires_a_signature() -> None:
    error = rejection(raw(SPLIT_DOC), hmac_key=KEY)
    assert (error.reason, error.command_id) == (control.UNSIGNED, "c-sig")
    error = rejection(raw(SPLIT_DOC | {"signature": None}), hmac_key=KEY)
    assert error.reason == control.UNSIGNED
    error = rejection(raw(SPLIT_DOC | {"signature": 12345}), hmac_key=KEY)
    assert error.reason == control.UNSIGNED


def test_the_signature_is_checked_before_the_command() -> None:
    """An unsigned command is rejected as unsigned, whatever else is wrong with it."""
    error = rejection(raw({"id": "c", "command": "reboot"}), hmac_key=KEY)
    assert error.reason == control.UNSIGNED
    error = rejection(raw({"id": "c", "command": "swap", "signature": "0" * 64}), hmac_key=KEY)
    assert error.reason == control.BAD_SIGNATURE


@pytest.mark.parametrize(
    "signature",
    [
        "sign-with-another-key",
        "",
        "0" * 64,
        "uppercase",
        "truncated",
        "é" * 64,  # non-ASCII: hmac.compare_digest refuses such a str (TypeError)
    ],
)
def test_a_wrong_signature_is_rejected(signature: str) -> None:
    good = sign(SPLIT_DOC, KEY)
    value = {
        "sign-with-another-key": sign(SPLIT_DOC, b"another key"),
        "uppercase": good.upper(),
        "truncated": good[:-1],
    }.get(signature, signature)
    error = rejection(raw(SPLIT_DOC | {"signature": value}), hmac_key=KEY)
    assert (error.reason, error.command_id) == (control.BAD_SIGNATURE, "c-sig")


CHANGES = {
    "id": lambda d: d | {"id": "c-other"},
    "command": lambda d: d | {"command": "status"},
    "model": lambda d: d | {"model": "spam"},
    "a weight": lambda d: d | {"weights": {"v1": 0.5, "v2": 0.5}},
    "a weight's version": lambda d: d | {"weights": {"v1": 0.75, "v3": 0.25}},
    "a zero weight added": lambda d: d | {"weights": {"v1": 0.75, "v2": 0.25, "v3": 0}},
    "an extra field": lambda d: d | {"note": "changed"},
    "an added field": lambda d: d | {"version": "v2"},
    "a removed field": lambda d: {k: v for k, v in d.items() if k != "note"},
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_the_signature_covers_every_field(change: str) -> None:
    doc = signed(SPLIT_DOC)
    parse_command(raw(doc), hmac_key=KEY)
    tampered = CHANGES[change](doc)
    assert tampered != doc
    assert tampered["signature"] == doc["signature"]
    error = rejection(raw(tampered), hmac_key=KEY)
    assert error.reason == control.BAD_SIGNATURE


def test_key_order_and_whitespace_do_not_matter() -> None:
    doc = signed(SPLIT_DOC)
    reordered = {k: doc[k] for k in reversed(list(doc))}
    reordered["weights"] = dict(reversed(list(doc["weights"].items())))
    assert list(reordered) != list(doc)
    data = json.dumps(reordered, indent=2, ensure_ascii=False).encode()
    assert data != raw(doc)
    assert parse_command(data, hmac_key=KEY).weights == {"v1": 0.75, "v2": 0.25}


def test_without_a_key_the_signature_is_ignored() -> None:
    for value in ("not-a-signature", 5, None, sign(SPLIT_DOC, b"any key")):
        cmd = parse_command(raw(SPLIT_DOC | {"signature": value}))
        assert cmd.command == "split"


def test_the_schema_wants_a_lowercase_hex_sha256_signature(
    validators: dict[str, Draft202012Validator],
) -> None:
    doc = signed(SPLIT_DOC)
    validators["control-command"].validate(doc)
    for bad in (doc["signature"].upper(), doc["signature"][:-1], 5, None):
        assert not validators["control-command"].is_valid(doc | {"signature": bad}), bad


def test_a_command_too_deep_for_canonical_json_is_rejected_not_raised() -> None:
    """orjson reads 1024 levels but writes 254: with a key, canonical() cannot be written."""
    data = b'{"id":"c-deep","command":"status","signature":"00","x":' + b"[" * 300
    data += b"]" * 300 + b"}"
    assert parse_command(data) == Command("c-deep", "status")  # no key: nothing is written
    error = rejection(data, hmac_key=KEY)
    assert (error.reason, error.command_id) == (control.MALFORMED, "c-deep")


# --- the routing table ----------------------------------------------------------------------


def test_the_initial_table_serves_one_version_per_model() -> None:
    table = fresh_table()
    assert table.routes == {"risk": Route.single("v1"), "spam": Route.single("a")}
    assert (table.history, table.changed_at, table.applied) == ({}, T0, 0)
    assert table.as_dict() == {
        "routes": {
            "risk": {"weights": {"v1": 1.0}, "shadow": None},
            "spam": {"weights": {"a": 1.0}, "shadow": None},
        },
        "changed_at": T0,
        "applied": 0,
    }


def test_commit_changes_one_model_and_records_when_and_how_often() -> None:
    table = fresh_table()
    apply(table, swap("v2"), T0 + 1)
    assert table.routes == {"risk": Route.single("v2"), "spam": Route.single("a")}
    assert (table.changed_at, table.applied) == (T0 + 1, 1)
    assert table.history == {"risk": [Route.single("v1")]}
    apply(table, swap("b", model="spam"), T0 + 2)
    assert table.routes == {"risk": Route.single("v2"), "spam": Route.single("b")}
    assert (table.changed_at, table.applied) == (T0 + 2, 2)
    assert table.as_dict()["applied"] == 2
    assert table.as_dict()["changed_at"] == T0 + 2


def test_swap_keeps_the_shadow_unless_it_now_serves() -> None:
    table = fresh_table()
    apply(table, shadow("v3"), T0 + 1)
    apply(table, swap("v2"), T0 + 2)
    assert table.routes["risk"] == Route(weights=(("v2", 1.0),), shadow="v3")
    apply(table, swap("v3"), T0 + 3)
    assert table.routes["risk"] == Route(weights=(("v3", 1.0),), shadow=None)


def test_swap_to_an_undeclared_version_is_rejected() -> None:
    table = fresh_table()
    with pytest.raises(ControlError) as info:
        table.plan(swap("v9"))
    assert info.value.reason == control.UNKNOWN_VERSION
    assert info.value.command_id.startswith("c-swap")
    assert "'v9'" in info.value.detail
    with pytest.raises(ControlError) as info:
        table.plan(swap("b"))  # a version of another model
    assert info.value.reason == control.UNKNOWN_VERSION


def test_split_orders_versions_as_declared_and_drops_zero_weights() -> None:
    table = fresh_table()
    apply(table, split({"v3": 0.25, "v2": 0.0, "v1": 0.75}), T0 + 1)
    assert table.routes["risk"].weights == (("v1", 0.75), ("v3", 0.25))
    apply(table, split({"v2": 1.0, "v3": 0.0}), T0 + 2)
    assert table.routes["risk"] == Route.single("v2")


def test_split_keeps_the_shadow() -> None:
    table = fresh_table()
    apply(table, shadow("v3"), T0 + 1)
    apply(table, split({"v1": 0.5, "v2": 0.5}), T0 + 2)
    assert table.routes["risk"] == Route(weights=(("v1", 0.5), ("v2", 0.5)), shadow="v3")


def test_split_weights_may_miss_1_by_the_tolerance_only() -> None:
    table = fresh_table()
    table.plan(split({"v1": 0.9, "v2": 0.1 - 1e-7}))
    with pytest.raises(ControlError) as info:
        table.plan(split({"v1": 0.9, "v2": 0.1 - 1e-5}))
    assert info.value.reason == control.INVALID_WEIGHTS


@pytest.mark.parametrize(
    ("weights", "reason"),
    [
        ({"v1": 0.5, "v9": 0.5}, control.UNKNOWN_VERSION),
        ({"v1": 0.5, "a": 0.5}, control.UNKNOWN_VERSION),
        ({"v1": 1.0, "v9": 0.0}, control.UNKNOWN_VERSION),
        ({"v1": 1.5, "v2": -0.5}, control.INVALID_WEIGHTS),
        ({"v1": 0.5, "v2": 0.4}, control.INVALID_WEIGHTS),
        ({"v1": 0.6, "v2": 0.6}, control.INVALID_WEIGHTS),
        ({"v1": 0.0}, control.INVALID_WEIGHTS),
    ],
    ids=str,
)
def test_a_bad_split_is_rejected(weights: dict[str, float], reason: str) -> None:
    table = fresh_table()
    with pytest.raises(ControlError) as info:
        table.plan(split(weights))
    assert info.value.reason == reason
    assert info.value.command_id.startswith("c-split")


def test_shadow_sets_and_clears_the_shadow() -> None:
    table = fresh_table()
    apply(table, split({"v1": 0.5, "v2": 0.5}), T0 + 1)
    apply(table, shadow("v3"), T0 + 2)
    assert table.routes["risk"] == Route(weights=(("v1", 0.5), ("v2", 0.5)), shadow="v3")
    apply(table, shadow(None), T0 + 3)
    assert table.routes["risk"] == Route(weights=(("v1", 0.5), ("v2", 0.5)), shadow=None)
    apply(table, shadow("v3"), T0 + 4)
    assert table.routes["risk"].shadow == "v3"
    apply(table, UNSHADOW, T0 + 5)
    assert table.routes["risk"] == Route(weights=(("v1", 0.5), ("v2", 0.5)), shadow=None)
    assert table.applied == 5
    with pytest.raises(ControlError) as info:
        table.plan(shadow("v9"))
    assert info.value.reason == control.UNKNOWN_VERSION


def test_rollback_walks_the_history_back_one_step_at_a_time() -> None:
    table = fresh_table()
    steps = [swap("v2"), split({"v2": 0.5, "v3": 0.5}), shadow("v1"), UNSHADOW]
    seen = [table.routes["risk"]]
    for i, cmd in enumerate(steps, start=1):
        apply(table, cmd, T0 + i)
        seen.append(table.routes["risk"])
    assert len(set(seen)) == len(seen) - 1  # unshadow brings back the split without shadow
    now = T0 + 10
    for expected in reversed(seen[:-1]):
        now += 1
        apply(table, rollback(), now)
        assert table.routes["risk"] == expected
        assert table.changed_at == now
    assert table.routes == {"risk": Route.single("v1"), "spam": Route.single("a")}
    assert table.applied == 2 * len(steps)
    assert table.history == {"risk": []}
    with pytest.raises(ControlError) as info:
        table.plan(ROLLBACK)
    assert (info.value.reason, info.value.command_id) == (
        control.NOTHING_TO_ROLL_BACK,
        "c-rollback",
    )


def test_rollback_is_per_model() -> None:
    table = fresh_table()
    with pytest.raises(ControlError) as info:
        table.plan(ROLLBACK)
    assert info.value.reason == control.NOTHING_TO_ROLL_BACK
    apply(table, swap("b", model="spam"), T0 + 1)
    with pytest.raises(ControlError) as info:
        table.plan(ROLLBACK)
    assert info.value.reason == control.NOTHING_TO_ROLL_BACK
    apply(table, Command("r", "rollback", "spam"), T0 + 2)
    assert table.routes["spam"] == Route.single("a")


def test_a_change_after_a_rollback_is_rolled_back_to_where_it_came_from() -> None:
    table = fresh_table()
    apply(table, swap("v2"), T0 + 1)
    apply(table, rollback(), T0 + 2)
    apply(table, swap("v3"), T0 + 3)
    apply(table, rollback(), T0 + 4)
    assert table.routes["risk"] == Route.single("v1")
    with pytest.raises(ControlError):
        table.plan(ROLLBACK)


@pytest.mark.parametrize("cmd", [STATUS, RESET], ids=lambda c: c.command)
def test_commands_that_change_no_routing_change_nothing(cmd: Command) -> None:
    table = fresh_table()
    apply(table, swap("v2"), T0 + 1)
    before = snapshot(table)
    routes = table.plan(cmd)
    assert routes == table.routes
    assert routes is not table.routes
    table.commit(cmd, routes, T0 + 99)
    assert snapshot(table) == before
    assert table.applied == 1


def test_reset_learner_names_a_declared_model_and_version() -> None:
    table = fresh_table()
    for cmd, reason in [
        (Command("r", "reset_learner", "risk", "v9"), control.UNKNOWN_VERSION),
        (Command("r", "reset_learner", "fraud", "v1"), control.UNKNOWN_MODEL),
    ]:
        with pytest.raises(ControlError) as info:
            table.plan(cmd)
        assert (info.value.reason, info.value.command_id) == (reason, "r")


@pytest.mark.parametrize(
    "cmd",
    [
        swap("v1", model="fraud"),
        split({"v1": 1.0}, model="fraud"),
        shadow("v1", model="fraud"),
        shadow(None, model="fraud"),
        Command("c", "unshadow", "fraud"),
        Command("c", "rollback", "fraud"),
        Command("c", "swap", None, "v1"),
    ],
    ids=lambda c: f"{c.command}-{c.model}",
)
def test_an_undeclared_model_is_rejected(cmd: Command) -> None:
    table = fresh_table()
    with pytest.raises(ControlError) as info:
        table.plan(cmd)
    assert (info.value.reason, info.value.command_id) == (control.UNKNOWN_MODEL, cmd.id)
    assert "'risk'" in info.value.detail  # names what is declared


REJECTED_PLANS = [
    swap("v9"),
    swap("v1", model="fraud"),
    split({"v1": 0.5, "v9": 0.5}),
    split({"v1": 0.5, "v2": 0.6}),
    split({"v1": 2.0, "v2": -1.0}),
    shadow("v9"),
    Command("c", "rollback", "spam"),
    Command("c", "reset_learner", "risk", "v9"),
]


@pytest.mark.parametrize("cmd", REJECTED_PLANS, ids=repr)
def test_a_rejected_plan_leaves_the_table_untouched(cmd: Command) -> None:
    table = fresh_table()
    apply(table, swap("v2"), T0 + 1)
    apply(table, shadow("v3"), T0 + 2)
    before = snapshot(table)
    with pytest.raises(ControlError):
        table.plan(cmd)
    assert snapshot(table) == before


@pytest.mark.parametrize(
    "cmd",
    [swap("v2"), split({"v1": 0.5, "v2": 0.5}), shadow("v2"), UNSHADOW, ROLLBACK, STATUS, RESET],
    ids=lambda c: c.command,
)
def test_a_plan_is_not_applied_until_committed(cmd: Command) -> None:
    table = fresh_table()
    apply(table, swap("v3"), T0 + 1)
    apply(table, shadow("v1"), T0 + 2)
    before = snapshot(table)
    routes = table.plan(cmd)
    assert snapshot(table) == before
    assert routes is not table.routes
    assert set(routes) == set(DECLARED)


def test_required_versions_include_the_shadows() -> None:
    routes = {
        "risk": Route.split({"v1": 0.5, "v2": 0.5}, ("v1", "v2", "v3")).with_shadow("v3"),
        "spam": Route.single("a"),
        "other": Route.single("x").with_shadow("x"),
    }
    assert required_versions(routes) == {
        ("risk", "v1"),
        ("risk", "v2"),
        ("risk", "v3"),
        ("spam", "a"),
        ("other", "x"),
    }
    assert required_versions({}) == set()
    table = fresh_table()
    planned = table.plan(shadow("v2"))
    assert required_versions(planned) == {("risk", "v1"), ("risk", "v2"), ("spam", "a")}


# --- acks -----------------------------------------------------------------------------------


def test_an_applied_ack(validators: dict[str, Draft202012Validator]) -> None:
    table = fresh_table()
    cmd = split({"v1": 0.9, "v2": 0.1})
    apply(table, cmd, T0 + 1)
    apply(table, shadow("v3"), T0 + 2)
    ack = encode_ack(
        command_id="c-split", command="split", worker="w-1", table=table, error=None, now=T0 + 3
    )
    doc = orjson.loads(ack)
    assert doc == {
        "command_id": "c-split",
        "command": "split",
        "worker": "w-1",
        "status": "applied",
        "routing": {
            "routes": {
                "risk": {"weights": {"v1": 0.9, "v2": 0.1}, "shadow": "v3"},
                "spam": {"weights": {"a": 1.0}, "shadow": None},
            },
            "changed_at": T0 + 2,
            "applied": 2,
        },
        "ts": T0 + 3,
    }
    validators["control-ack"].validate(doc)


def test_a_rejected_ack(validators: dict[str, Draft202012Validator]) -> None:
    table = fresh_table()
    error = ControlError(control.UNKNOWN_VERSION, "no v9", command_id="c-swap")
    doc = orjson.loads(
        encode_ack(
            command_id="c-swap", command="swap", worker="w-2", table=table, error=error, now=T0
        )
    )
    assert doc["status"] == "rejected"
    assert (doc["reason"], doc["detail"]) == (control.UNKNOWN_VERSION, "no v9")
    assert doc["routing"] == table.as_dict()
    assert list(doc) == [
        "command_id",
        "command",
        "worker",
        "status",
        "routing",
        "ts",
        "reason",
        "detail",
    ]
    validators["control-ack"].validate(doc)


@pytest.mark.parametrize("reason", sorted(REASONS))
def test_every_reason_has_a_valid_ack(
    validators: dict[str, Draft202012Validator], reason: str
) -> None:
    error = ControlError(reason, "detail")
    for command_id, command in ((None, None), ("c", None), ("c", "swap")):
        ack = encode_ack(
            command_id=command_id,
            command=command,
            worker="w",
            table=fresh_table(),
            error=error,
            now=T0,
        )
        validators["control-ack"].validate(orjson.loads(ack))


def ack_like_the_worker(
    data: bytes | None, table: RoutingTable, *, hmac_key: bytes | None = None
) -> dict[str, Any]:
    """What the worker's control plane (runtime/control_plane.py: ControlPlane.apply, then
    the ack of ControlPlane.handle) does with one command, loading versions aside: parse,
    plan, commit, ack."""
    cmd: Command | None = None
    error: ControlError | None = None
    try:
        cmd = parse_command(data, hmac_key=hmac_key)
        table.commit(cmd, table.plan(cmd), T0 + 50)
    except ControlError as exc:
        error = exc
    ack = encode_ack(
        command_id=cmd.id if cmd else getattr(error, "command_id", None),
        command=cmd.command if cmd else None,
        worker="w",
        table=table,
        error=error,
        now=T0 + 60,
    )
    return dict(orjson.loads(ack))


def test_acks_of_real_commands_validate(validators: dict[str, Draft202012Validator]) -> None:
    table = fresh_table()
    inputs = [raw(doc) for doc, _ in GOOD_COMMANDS if doc.get("model", "risk") in DECLARED]
    inputs += [raw(c[1]) for c in BAD_COMMANDS]
    inputs += [None, b"", b"{nope", raw(new_command("rollback", model="spam"))]
    statuses = []
    for data in inputs:
        doc = ack_like_the_worker(data, table)
        validators["control-ack"].validate(doc)
        statuses.append(doc["status"])
    assert "applied" in statuses
    assert "rejected" in statuses
    for data in (raw(SPLIT_DOC), raw(signed(SPLIT_DOC, b"wrong")), raw(signed(SPLIT_DOC))):
        validators["control-ack"].validate(ack_like_the_worker(data, table, hmac_key=KEY))


def good_ack(**change: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "command_id": "c",
        "command": "swap",
        "worker": "w",
        "status": "applied",
        "routing": {
            "routes": {"risk": {"weights": {"v2": 1.0}, "shadow": None}},
            "changed_at": T0,
            "applied": 1,
        },
        "ts": T0,
    }
    doc.update(change)
    return doc


ROUTING_EMPTY_WEIGHTS = {
    "routes": {"risk": {"weights": {}, "shadow": None}},
    "changed_at": T0,
    "applied": 1,
}
ROUTING_NO_SHADOW = {"routes": {"risk": {"weights": {"v2": 1.0}}}, "changed_at": T0, "applied": 1}
ROUTING_NEGATIVE = {"routes": {}, "changed_at": T0, "applied": -1}


@pytest.mark.parametrize(
    "change",
    [
        {"status": "ok"},
        {"reason": control.UNKNOWN_MODEL, "detail": "x"},  # applied acks carry no reason
        {"status": "rejected"},  # rejected acks carry one
        {"status": "rejected", "reason": "exploded", "detail": "x"},
        {"status": "rejected", "reason": control.UNKNOWN_MODEL},
        {"command_id": None},  # an applied command had an id
        {"command": "reboot"},
        {"command_id": 5},
        {"worker": None},
        {"ts": "now"},
        {"routing": ROUTING_EMPTY_WEIGHTS},
        {"routing": ROUTING_NO_SHADOW},
        {"routing": ROUTING_NEGATIVE},
    ],
    ids=str,
)
def test_malformed_acks_fail(
    validators: dict[str, Draft202012Validator], change: dict[str, Any]
) -> None:
    validators["control-ack"].validate(good_ack())
    assert not validators["control-ack"].is_valid(good_ack(**change))


def test_an_ack_missing_a_field_fails(validators: dict[str, Draft202012Validator]) -> None:
    for field in validators["control-ack"].schema["required"]:
        doc = good_ack()
        del doc[field]
        assert not validators["control-ack"].is_valid(doc), field


# --- `stream-infer control` usage errors ----------------------------------------------------


class _NoBroker:
    """Stands in for Controller: a usage error must come before any connection."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pytest.fail("the command tried to reach the broker instead of refusing its arguments")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["split", "--model", "risk"], "split needs --weight VERSION=WEIGHT"),
        (["split", "--model", "risk", "--weight", "v2"], "--weight 'v2': expected VERSION=WEIGHT"),
        (
            ["split", "--model", "risk", "--weight", "v1=0.9", "--weight", "v2=abc"],
            "--weight 'v2=abc': expected VERSION=WEIGHT",
        ),
        (["split", "--model", "risk", "--weight", "=1"], "--weight '=1': expected VERSION=WEIGHT"),
        (["swap", "--model", "risk"], "swap needs --version"),
        (["swap", "--version", "v2"], "swap needs --model"),
        (["split", "--weight", "v1=1"], "split needs --model"),
        (["shadow", "--version", "v2"], "shadow needs --model"),
        (["unshadow"], "unshadow needs --model"),
        (["rollback"], "rollback needs --model"),
        (["reboot", "--model", "risk"], "'reboot' is not one of"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_control_usage_errors_exit_2_before_any_connection(
    monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.setattr("stream_infer.io.controller.Controller", _NoBroker)
    result = CliRunner().invoke(cli, ["control", str(TOPOLOGY), *args])
    assert result.exit_code == 2, (result.output, result.exception)
    assert message in result.output
    assert "Traceback" not in result.output


# --- issue 13: the routing is a pure function of the log (items 8, 9, 12, 18) -----------------


def run_log(table: RoutingTable, docs: list[dict[str, Any]]) -> list[str | None]:
    """Apply each document as a worker would; the rejection reason of each (None: applied)."""
    out: list[str | None] = []
    for doc in docs:
        try:
            table.apply(parse_command(raw(doc)), T0)
        except ControlError as exc:
            out.append(exc.reason)
        else:
            out.append(None)
    return out


def test_policy_swaps_from_several_workers_and_a_rollback_walk_back_one_step() -> None:
    table = RoutingTable.initial({"risk": ("v1", "v2", "online")}, {"risk": "v1"}, now=T0)
    split_doc = {"id": "c1", "command": "split", "model": "risk", "weights": {"v1": 0.9, "v2": 0.1}}
    copies = [{"id": "drift-x", "command": "swap", "model": "risk", "version": "v1"}] * 3
    undo = {"id": "op", "command": "rollback", "model": "risk"}
    reasons = run_log(table, [split_doc, *copies, undo])
    assert reasons == [None, None, control.DUPLICATE, control.DUPLICATE, None]
    assert table.routes["risk"] == Route.split({"v1": 0.9, "v2": 0.1}, ("v1", "v2", "online"))


def test_a_command_that_changes_nothing_pushes_no_history() -> None:
    table = RoutingTable.initial({"risk": ("v1", "v2")}, {"risk": "v1"}, now=T0)
    docs = [
        {"id": "a", "command": "swap", "model": "risk", "version": "v2"},
        {"id": "b", "command": "swap", "model": "risk", "version": "v2"},
        {"id": "c", "command": "rollback", "model": "risk"},
    ]
    assert run_log(table, docs) == [None, None, None]
    assert table.routes["risk"] == Route.single("v1")
    assert table.applied == 2  # the no-op swap is not counted


def test_a_rollback_delivered_twice_walks_back_once() -> None:
    table = RoutingTable.initial({"risk": ("v1", "v2", "online")}, {"risk": "v1"}, now=T0)
    docs = [
        {"id": "c1", "command": "swap", "model": "risk", "version": "v2"},
        {"id": "c2", "command": "split", "model": "risk", "weights": {"v2": 0.5, "online": 0.5}},
        {"id": "rb", "command": "rollback", "model": "risk"},
        {"id": "rb", "command": "rollback", "model": "risk"},
    ]
    assert run_log(table, docs) == [None, None, None, control.DUPLICATE]
    assert table.routes["risk"] == Route.single("v2")


def test_an_id_is_burned_even_when_its_command_is_rejected() -> None:
    # A signed rollback rejected today must not roll back when replayed tomorrow.
    table = RoutingTable.initial({"risk": ("v1", "v2")}, {"risk": "v1"}, now=T0)
    docs = [
        {"id": "rb", "command": "rollback", "model": "risk"},
        {"id": "s", "command": "swap", "model": "risk", "version": "v2"},
        {"id": "rb", "command": "rollback", "model": "risk"},
    ]
    assert run_log(table, docs) == [control.NOTHING_TO_ROLL_BACK, None, control.DUPLICATE]
    assert table.routes["risk"] == Route.single("v2")


def test_shadow_of_a_serving_version_is_rejected() -> None:
    table = fresh_table()
    with pytest.raises(ControlError) as info:
        table.plan(shadow("v1"))
    assert info.value.reason == control.SHADOW_SERVES
    apply(table, split({"v1": 0.5, "v2": 0.5}), T0)
    with pytest.raises(ControlError):
        table.plan(shadow("v2"))
    assert table.plan(shadow("v3"))["risk"].shadow == "v3"


def test_a_split_onto_the_shadow_drops_the_shadow() -> None:
    table = fresh_table()
    apply(table, shadow("v2"), T0)
    apply(table, split({"v1": 0.5, "v2": 0.5}), T0)
    assert table.routes["risk"].shadow is None


def test_reset_learner_applies_alike_on_every_table_whatever_learners_its_worker_runs() -> None:
    """The table never asks the worker's configuration (two workers may run different
    topologies during a rolling deploy): a reset of any declared version counts in the
    generation on every table, so a later command's if_generation means the same everywhere;
    a worker without that learner says so in its ack (the control plane's NOT_A_LEARNER)."""
    tables = [fresh_table(), fresh_table()]
    for table in tables:
        table.apply(Command("r", "reset_learner", "risk", "v2"), T0)
    assert [t.generation for t in tables] == [1, 1] and all(t.applied == 0 for t in tables)
    with pytest.raises(ControlError) as info:
        tables[0].plan(Command("x", "reset_learner", "risk", "v9"))
    assert info.value.reason == control.UNKNOWN_VERSION


def test_the_generation_counts_changes_only() -> None:
    table = fresh_table()
    assert table.generation == 0
    apply(table, swap("v2"), T0)
    apply(table, Command("s", "status"), T0)
    apply(table, Command("again", "swap", "risk", "v2"), T0)
    assert table.generation == 1


def stdlib_signed(doc: dict[str, Any], **dumps: Any) -> dict[str, Any]:
    body = json.dumps(doc, sort_keys=True, separators=(",", ":"), **dumps).encode()
    return doc | {"signature": hmac.new(KEY, body, hashlib.sha256).hexdigest()}


@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_a_stdlib_json_signer_is_accepted_with_non_ascii_text_and_small_floats(
    ensure_ascii: bool,
) -> None:
    doc = {
        "id": "c-é-☃",
        "command": "split",
        "model": "risk",
        "weights": {"v1": 1 - 1e-7, "v2": 1e-7},
        "note": "Zürich 🚀",
    }
    assert json.dumps(1e-7) == "1e-07" and orjson.dumps(1e-7) == b"1e-7"  # the two differ
    sent = stdlib_signed(doc, ensure_ascii=ensure_ascii)
    cmd = parse_command(json.dumps(sent, ensure_ascii=ensure_ascii).encode(), hmac_key=KEY)
    assert cmd.id == "c-é-☃"
    forged = sent | {"note": "Zurich"}
    with pytest.raises(ControlError) as info:
        parse_command(json.dumps(forged).encode(), hmac_key=KEY)
    assert info.value.reason == control.BAD_SIGNATURE


def test_the_command_schema_states_the_canonical_forms() -> None:
    text = (ROOT / "schemas" / "control-command.schema.json").read_text()
    assert 'json.dumps(body, sort_keys=True, separators=(\\",\\", \\":\\"))' in text
    assert "ensure_ascii" in text


def test_a_command_older_than_the_max_age_at_its_log_time_is_expired() -> None:
    doc = {"id": "c", "command": "swap", "model": "risk", "version": "v2", "issued_at": T0}
    data = raw(signed(doc))
    ok = parse_command(data, hmac_key=KEY, max_age_s=60.0, record_ts=T0 + 59)
    assert ok.issued_at == T0
    for record_ts in (T0 + 61, T0 - 61, None):
        with pytest.raises(ControlError) as info:
            parse_command(data, hmac_key=KEY, max_age_s=60.0, record_ts=record_ts)
        assert info.value.reason == control.EXPIRED
    undated = raw(signed({k: v for k, v in doc.items() if k != "issued_at"}))
    with pytest.raises(ControlError) as info:
        parse_command(undated, hmac_key=KEY, max_age_s=60.0, record_ts=T0)
    assert info.value.reason == control.EXPIRED
    # Without a max age, issued_at is carried (and signed) but not checked.
    assert parse_command(data, hmac_key=KEY, record_ts=T0 + 10**6).issued_at == T0
