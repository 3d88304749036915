"""Control commands and the routing they change. Pure: no Kafka, no faust, no torch.

Commands (JSON, one per message on the control topic; schemas/control-command.schema.json):

    {"id": "c1", "command": "swap", "model": "risk", "version": "v2"}
    {"id": "c2", "command": "split", "model": "risk", "weights": {"v1": 0.9, "v2": 0.1}}
    {"id": "c3", "command": "shadow", "model": "risk", "version": "v2"}   # "version": null stops
    {"id": "c4", "command": "unshadow", "model": "risk"}
    {"id": "c5", "command": "rollback", "model": "risk"}
    {"id": "c6", "command": "status"}

Only what is declared changeable changes: a command names a declared model and declared
versions, or it is rejected with a reason and nothing changes. When the topology sets an HMAC
key, a command must carry ``"signature"``: hex HMAC-SHA256 of the command's canonical JSON
(keys sorted, no whitespace, without the signature field).
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from stream_infer.errors import ControlError
from stream_infer.routing import Route

COMMANDS = ("swap", "split", "shadow", "unshadow", "rollback", "status", "reset_learner")
# Commands that act on something other than the routing; the routing stays as it is.
NO_ROUTING_CHANGE = ("status", "reset_learner")
MAX_COMMAND_BYTES = 64 * 1024

# Rejection reasons.
MALFORMED = "malformed_command"
UNKNOWN_COMMAND = "unknown_command"
UNSIGNED = "unsigned"
BAD_SIGNATURE = "bad_signature"
UNKNOWN_MODEL = "unknown_model"
UNKNOWN_VERSION = "unknown_version"
INVALID_WEIGHTS = "invalid_weights"
NOTHING_TO_ROLL_BACK = "nothing_to_roll_back"
NOT_A_LEARNER = "not_a_learner"
ARTIFACT_INVALID = "artifact_invalid"


@dataclass(frozen=True)
class Command:
    id: str
    command: str
    model: str | None = None
    version: str | None = None
    weights: Mapping[str, float] | None = None


def canonical(doc: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: the command without its signature, keys sorted."""
    body = {k: v for k, v in doc.items() if k != "signature"}
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def sign(doc: Mapping[str, Any], key: bytes) -> str:
    return hmac.new(key, canonical(doc), hashlib.sha256).hexdigest()


def _str_field(doc: Mapping[str, Any], name: str, command_id: str) -> str:
    value = doc.get(name)
    if not isinstance(value, str) or not value:
        msg = f"'{name}' must be a non-empty string, got {value!r}"
        raise ControlError(MALFORMED, msg, command_id=command_id)
    return value


def parse_command(raw: bytes | None, *, hmac_key: bytes | None = None) -> Command:
    """Decode, authenticate and check the shape of one command. Raises ControlError."""
    if not raw or len(raw) > MAX_COMMAND_BYTES:
        size = len(raw) if raw else 0
        raise ControlError(MALFORMED, f"a command is 1..{MAX_COMMAND_BYTES} bytes, got {size}")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ControlError(MALFORMED, f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ControlError(MALFORMED, f"a command is a JSON object, got {type(doc).__name__}")
    command_id = doc.get("id")
    if not isinstance(command_id, str) or not command_id:
        raise ControlError(MALFORMED, "'id' must be a non-empty string")
    if hmac_key is not None:
        signature = doc.get("signature")
        if not isinstance(signature, str):
            msg = "this topology requires signed commands; 'signature' is missing"
            raise ControlError(UNSIGNED, msg, command_id=command_id)
        try:
            expected = sign(doc, hmac_key)
        except orjson.JSONEncodeError as exc:  # e.g. nested deeper than orjson writes
            msg = f"cannot write the command's canonical JSON to check its signature: {exc}"
            raise ControlError(MALFORMED, msg, command_id=command_id) from None
        # As bytes: compare_digest raises TypeError on a str with non-ASCII characters.
        if not hmac.compare_digest(signature.encode(), expected.encode()):
            msg = "the signature does not match the command"
            raise ControlError(BAD_SIGNATURE, msg, command_id=command_id)
    name = doc.get("command")
    if name not in COMMANDS:
        msg = f"unknown command {name!r}; known: {', '.join(COMMANDS)}"
        raise ControlError(UNKNOWN_COMMAND, msg, command_id=command_id)
    if name == "status":
        return Command(command_id, name)
    model = _str_field(doc, "model", command_id)
    if name in ("swap", "reset_learner"):
        return Command(command_id, name, model, _str_field(doc, "version", command_id))
    if name == "shadow":
        version = doc.get("version")
        if version is not None:
            version = _str_field(doc, "version", command_id)
        return Command(command_id, name, model, version)
    if name == "split":
        weights = doc.get("weights")
        if not isinstance(weights, dict) or not weights:
            msg = "'weights' must be an object of version -> weight"
            raise ControlError(INVALID_WEIGHTS, msg, command_id=command_id)
        for version, weight in weights.items():
            if type(weight) not in (int, float) or not math.isfinite(weight):
                msg = f"weight of {version!r} must be a finite number, got {weight!r}"
                raise ControlError(INVALID_WEIGHTS, msg, command_id=command_id)
        return Command(command_id, name, model, weights={k: float(v) for k, v in weights.items()})
    return Command(command_id, name, model)  # unshadow, rollback


@dataclass
class RoutingTable:
    """The routing of every model, its history (for rollback), and when it last changed."""

    declared: Mapping[str, tuple[str, ...]]
    routes: dict[str, Route]
    history: dict[str, list[Route]] = field(default_factory=dict)
    changed_at: float = 0.0
    applied: int = 0

    @classmethod
    def initial(
        cls, declared: Mapping[str, tuple[str, ...]], serving: Mapping[str, str], now: float
    ) -> RoutingTable:
        routes = {model: Route.single(version) for model, version in serving.items()}
        return cls(declared=dict(declared), routes=routes, changed_at=now)

    def plan(self, cmd: Command) -> dict[str, Route]:
        """The routes after ``cmd``, without applying it. Raises ControlError if invalid."""
        if cmd.command == "status":
            return dict(self.routes)
        model = cmd.model or ""
        if model not in self.declared:
            msg = f"unknown model {model!r}; declared: {sorted(self.declared)}"
            raise ControlError(UNKNOWN_MODEL, msg, command_id=cmd.id)
        versions = self.declared[model]
        current = self.routes[model]

        def known(version: str) -> str:
            if version not in versions:
                msg = f"model {model!r} has no version {version!r}; declared: {list(versions)}"
                raise ControlError(UNKNOWN_VERSION, msg, command_id=cmd.id)
            return version

        if cmd.command == "reset_learner":
            known(cmd.version or "")
            return dict(self.routes)
        if cmd.command == "swap":
            version = known(cmd.version or "")
            # A shadow of the version that now serves would only score it twice.
            new = Route.single(version).with_shadow(
                None if current.shadow == version else current.shadow
            )
        elif cmd.command == "split":
            for version in cmd.weights or {}:
                known(version)
            try:
                new = Route.split(cmd.weights or {}, versions).with_shadow(current.shadow)
            except ValueError as exc:
                raise ControlError(INVALID_WEIGHTS, str(exc), command_id=cmd.id) from None
        elif cmd.command == "shadow":
            new = current.with_shadow(known(cmd.version) if cmd.version else None)
        elif cmd.command == "unshadow":
            new = current.with_shadow(None)
        else:  # rollback
            if not self.history.get(model):
                msg = f"model {model!r} has no earlier routing to roll back to"
                raise ControlError(NOTHING_TO_ROLL_BACK, msg, command_id=cmd.id)
            new = self.history[model][-1]
        return {**self.routes, model: new}

    def commit(self, cmd: Command, routes: dict[str, Route], now: float) -> None:
        """Make ``routes`` (from :meth:`plan`) the routing in force."""
        if cmd.command in NO_ROUTING_CHANGE:
            return
        model = cmd.model or ""
        if cmd.command == "rollback":
            self.history[model].pop()
        else:
            self.history.setdefault(model, []).append(self.routes[model])
        self.routes = routes
        self.changed_at = now
        self.applied += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "routes": {m: r.as_dict() for m, r in sorted(self.routes.items())},
            "changed_at": self.changed_at,
            "applied": self.applied,
        }


def required_versions(routes: Mapping[str, Route]) -> set[tuple[str, str]]:
    """Every (model, version) the routes need loaded: serving and shadow."""
    needed: set[tuple[str, str]] = set()
    for model, route in routes.items():
        needed.update((model, v) for v in route.versions)
        if route.shadow:
            needed.add((model, route.shadow))
    return needed


def encode_ack(
    *,
    command_id: str | None,
    command: str | None,
    worker: str,
    table: RoutingTable,
    error: ControlError | None,
    now: float,
) -> bytes:
    doc: dict[str, Any] = {
        "command_id": command_id,
        "command": command,
        "worker": worker,
        "status": "rejected" if error else "applied",
        "routing": table.as_dict(),
        "ts": now,
    }
    if error is not None:
        doc["reason"] = error.reason
        doc["detail"] = error.detail
    return orjson.dumps(doc)
