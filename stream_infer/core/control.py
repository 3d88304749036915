"""Control commands and the routing they change. Pure: no Kafka, no faust, no torch.

Commands (JSON, one per message on the control topic; schemas/control-command.schema.json):

    {"id": "c1", "command": "swap", "model": "risk", "version": "v2"}
    {"id": "c2", "command": "split", "model": "risk", "weights": {"v1": 0.9, "v2": 0.1}}
    {"id": "c3", "command": "shadow", "model": "risk", "version": "v2"}   # "version": null stops
    {"id": "c4", "command": "unshadow", "model": "risk"}
    {"id": "c5", "command": "rollback", "model": "risk"}
    {"id": "c6", "command": "status"}
    {"id": "c7", "command": "rollout", "model": "risk", "version": "v2",
     "plan": {"steps": [0, 0.05, 0.25, 0.5, 1], "metric": "log_loss", "margin": 0.01,
              "confidence": 0.95, "min_labels": 500, "max_duration_s": 600,
              "on_timeout": "hold"}}
    {"id": "c8", "command": "rollout", "model": "risk", "action": "resume"}

A ``rollout`` moves the candidate ``version`` through the plan's weight steps, gated on labels
(:mod:`stream_infer.core.rollout`); the command itself routes step 0. Each later step is an
ordinary ``split`` / ``swap`` (or, for a step that timed out on ``hold``, a ``rollout`` with
``"action": "hold"``; a driver that begins driving, ``"action": "takeover"``) that one
worker, the rollout's driver, writes to the log with a ``"rollout"`` tag: ``{"id": <the
rollout command's id>, "step", "decision", "reason", "evidence"}``. The table checks the tag
against the rollout in force (its id, the step that follows, still running), so a stale
driver's copy changes nothing, and the body against the plan (an advance routes the step's
weight, a promote swaps to the candidate at the last step, an abort swaps to the incumbent);
an abort routes what served before the rollout began. A rollout's record is timed by the
log only (a command's ``issued_at``, else its record's timestamp), never by the applying
machine's clock. Any other command that changes the model's routing (an operator's
``swap``, ``split``, ``rollback``, a drift policy's) cancels the rollout: the operator's word
wins, and the driver stops.

Only what is declared changeable changes: a command names a declared model and declared
versions, or it is rejected with a reason and nothing changes. When the topology sets an HMAC
key, a command must carry ``"signature"``: hex HMAC-SHA256 of the command's canonical JSON
(keys sorted, no whitespace, without the signature field; :func:`canonical_forms` lists the
writers accepted).

The :class:`RoutingTable` is a pure function of the control log and the topology: whether a
command is applied depends only on the commands before it (its id not seen before, the model
and versions declared, the weights valid, something to roll back, the record's own time
against ``issued_at``), never on this machine (its artifacts, its clock, its memory). So every
worker that has read the same log holds the same table. Whether this worker can *load* what
the table routes is the runtime's affair, reported apart (an ack's ``applied_not_loaded``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, get_args

import orjson

from stream_infer.core.events import ModelVersion
from stream_infer.core.rollout import Metric, RolloutPlan
from stream_infer.core.routing import Route
from stream_infer.errors import ControlError

COMMANDS = (
    "swap",
    "split",
    "shadow",
    "unshadow",
    "rollback",
    "status",
    "reset_learner",
    "rollout",
)
ROLLOUT_ACTIONS = ("start", "hold", "resume", "takeover")
ROLLOUT_DECISIONS = ("advance", "hold", "promote", "abort", "takeover")
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
DUPLICATE = "duplicate_command"
SHADOW_SERVES = "shadow_serves"
EXPIRED = "expired"
STALE = "stale"
INVALID_ROLLOUT = "invalid_rollout"
ROLLOUT_CONFLICT = "rollout_conflict"
# The longest command id accepted (new_command_id makes 16 characters, derived_command_id 38).
MAX_ID_CHARS = 128

# Ack statuses: applied; rejected (nothing changed); applied to the routing table, as on every
# worker, but this worker cannot load what it routes.
STATUSES = ("applied", "rejected", "applied_not_loaded")


@dataclass(frozen=True)
class Command:
    id: str
    command: str
    model: str | None = None
    version: str | None = None
    weights: Mapping[str, float] | None = None
    issued_at: float | None = None
    # Apply only if the routing table is at this generation (drift policies: a command
    # computed from a routing that has changed since is stale).
    if_generation: int | None = None
    # ``rollout``: start (with the plan), hold (the driver's) or resume (an operator's).
    action: str | None = None
    # ``rollout`` start: the plan document; a driver's step command: its tag (see above).
    rollout: Mapping[str, Any] | None = None
    # When the control log got it (the Kafka record's timestamp; None when not read from a
    # log): a rollout's record times a command without ``issued_at`` by it.
    logged_at: float | None = None


def canonical(doc: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: the command without its signature, keys sorted.

    This is the form :func:`sign` writes (orjson's); :func:`canonical_forms` lists every form
    a signature is checked against.
    """
    body = {k: v for k, v in doc.items() if k != "signature"}
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def canonical_forms(doc: Mapping[str, Any]) -> list[bytes]:
    """Every serialization of the command (without ``signature``) a signature may cover.

    1. ``orjson.dumps(body, option=OPT_SORT_KEYS)``: UTF-8, non-ASCII characters as they are,
       floats in their shortest round-trip form with no padding (``1e-7``);
    2. ``json.dumps(body, sort_keys=True, separators=(",", ":"))`` (Python's standard
       library, ``ensure_ascii`` true): non-ASCII characters as ``\\uXXXX``, floats as
       ``repr`` (``1e-07``);
    3. the same with ``ensure_ascii=False``, UTF-8.

    Each is a JSON text that parses back to the same body, so two different bodies never
    share a form, and accepting several grants nothing a key does not.
    """
    body = {k: v for k, v in doc.items() if k != "signature"}
    forms = [orjson.dumps(body, option=orjson.OPT_SORT_KEYS)]
    for ascii_only in (True, False):
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=ascii_only)
        form = text.encode("utf-8", "surrogatepass")
        if form not in forms:
            forms.append(form)
    return forms


def new_command_id() -> str:
    """A fresh unique command id, for a command an operator sends: ``cmd-`` and 12 random hex
    digits. The one place such ids are minted (drift policies derive theirs:
    :func:`derived_command_id`).

    >>> command_id = new_command_id()
    >>> command_id.startswith("cmd-"), len(command_id), command_id == new_command_id()
    (True, 16, False)
    """
    return f"cmd-{uuid.uuid4().hex[:12]}"


def derived_command_id(body: Mapping[str, Any], generation: int) -> str:
    """The id of a command computed from the control log (a drift policy's): ``drift-`` and a
    digest of the command (without ``id``) and the routing ``generation`` it was computed at.

    Every worker that sees the drift computes the same command at the same generation, so they
    all mint the same id and the log applies it once (the later copies are rejected
    ``duplicate_command``). The digest is part of the wire contract between workers of
    different releases: it must not change.

    >>> body = {"command": "swap", "model": "risk", "version": "v2", "if_generation": 3}
    >>> derived_command_id(body, 3)
    'drift-7f1ca516f79008230bf4406c797712db'
    """
    digest = hashlib.sha256(
        orjson.dumps([generation, dict(body)], option=orjson.OPT_SORT_KEYS)
    ).hexdigest()
    return f"drift-{digest[:32]}"


def sign(doc: Mapping[str, Any], key: bytes) -> str:
    """Hex HMAC-SHA256 of the command's :func:`canonical` form (its ``signature`` left out)."""
    return hmac.new(key, canonical(doc), hashlib.sha256).hexdigest()


def seal(doc: Mapping[str, Any], key: bytes | None, now: float) -> dict[str, Any]:
    """A command as it is sent: stamped ``issued_at`` (``now``, unless it has one) and, with
    a key, signed over both. The one place commands are stamped and signed (the operator's
    client and the drift policies).

    >>> doc = seal({"id": "c6", "command": "status"}, b"s3cret", now=1_700_000_000.0)
    >>> doc["issued_at"], len(doc["signature"])
    (1700000000.0, 64)
    >>> cmd = parse_command(orjson.dumps(doc), hmac_key=b"s3cret")
    >>> cmd.id, cmd.command, cmd.issued_at
    ('c6', 'status', 1700000000.0)
    >>> parse_command(orjson.dumps(doc), hmac_key=b"another key")
    Traceback (most recent call last):
      ...
    stream_infer.errors.ControlError: bad_signature: the signature does not match the command
    """
    out = {"issued_at": now} | dict(doc)
    if key is not None:
        out["signature"] = sign(out, key)
    return out


def _signature_matches(doc: Mapping[str, Any], signature: str, key: bytes) -> bool:
    given = signature.encode()  # as bytes: compare_digest raises TypeError on non-ASCII str
    found = False
    for form in canonical_forms(doc):  # every form compared: the time does not say which
        expected = hmac.new(key, form, hashlib.sha256).hexdigest().encode()
        found |= hmac.compare_digest(given, expected)
    return found


def _str_field(doc: Mapping[str, Any], name: str, command_id: str) -> str:
    value = doc.get(name)
    if not isinstance(value, str) or not value:
        msg = f"'{name}' must be a non-empty string, got {value!r}"
        raise ControlError(MALFORMED, msg, command_id=command_id)
    return value


def _issued_at(
    doc: Mapping[str, Any], command_id: str, max_age_s: float | None, record_ts: float | None
) -> float | None:
    """The command's ``issued_at``; with ``max_age_s``, checked against the record's log time."""
    value = doc.get("issued_at")
    if value is not None and (type(value) not in (int, float) or not math.isfinite(value)):
        msg = f"'issued_at' must be seconds since the Unix epoch, got {value!r}"
        raise ControlError(MALFORMED, msg, command_id=command_id)
    if max_age_s is None:
        return None if value is None else float(value)
    if value is None:
        msg = f"this topology accepts commands at most {max_age_s:g} s old: 'issued_at' is missing"
        raise ControlError(EXPIRED, msg, command_id=command_id)
    if record_ts is None:
        msg = "the control record carries no timestamp to check 'issued_at' against"
        raise ControlError(EXPIRED, msg, command_id=command_id)
    if abs(record_ts - value) > max_age_s:
        msg = (
            f"issued at {value:.3f}, written to the control log at {record_ts:.3f}: "
            f"more than {max_age_s:g} s apart"
        )
        raise ControlError(EXPIRED, msg, command_id=command_id)
    return float(value)


def parse_command(
    raw: bytes | None,
    *,
    hmac_key: bytes | None = None,
    max_age_s: float | None = None,
    record_ts: float | None = None,
) -> Command:
    """Decode, authenticate and check the shape of one command. Raises ControlError.

    ``max_age_s``: the command must carry ``issued_at`` within that many seconds of
    ``record_ts``, the time its record was written to the control log (Kafka's record
    timestamp). Both are in the log, so the answer is the same live, at every replay and on
    every worker.
    """
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
    if not isinstance(command_id, str) or not command_id or len(command_id) > MAX_ID_CHARS:
        msg = f"'id' must be a non-empty string of at most {MAX_ID_CHARS} characters"
        raise ControlError(MALFORMED, msg)
    if hmac_key is not None:
        signature = doc.get("signature")
        if not isinstance(signature, str):
            msg = "this topology requires signed commands; 'signature' is missing"
            raise ControlError(UNSIGNED, msg, command_id=command_id)
        try:
            matches = _signature_matches(doc, signature, hmac_key)
        except (orjson.JSONEncodeError, ValueError, RecursionError) as exc:  # e.g. too deep
            msg = f"cannot write the command's canonical JSON to check its signature: {exc}"
            raise ControlError(MALFORMED, msg, command_id=command_id) from None
        if not matches:
            msg = "the signature does not match the command"
            raise ControlError(BAD_SIGNATURE, msg, command_id=command_id)
    issued_at = _issued_at(doc, command_id, max_age_s, record_ts)
    cmd = _shape(doc, command_id, issued_at)
    return cmd if record_ts is None else replace(cmd, logged_at=float(record_ts))


def _shape(doc: Mapping[str, Any], command_id: str, issued_at: float | None) -> Command:
    """The command of an authenticated document; ControlError if a field is wrong."""
    cmd = _fields(doc, command_id)
    if_generation = doc.get("if_generation")
    if if_generation is not None and (type(if_generation) is not int or if_generation < 0):
        msg = f"'if_generation' must be an integer >= 0, got {if_generation!r}"
        raise ControlError(MALFORMED, msg, command_id=command_id)
    tag = doc.get("rollout")
    if cmd.command in ("split", "swap", "shadow") and tag is not None:
        tag = _rollout_tag(tag, command_id)
    elif cmd.command != "rollout":
        tag = None
    return Command(
        cmd.id,
        cmd.command,
        cmd.model,
        cmd.version,
        cmd.weights,
        issued_at,
        if_generation,
        action=cmd.action,
        rollout=tag if cmd.command != "rollout" else cmd.rollout,
    )


def _rollout_tag(tag: Any, command_id: str) -> dict[str, Any]:
    """A driver's step tag: ``{"id", "step", "decision", ...}``; ControlError if malformed."""
    if (
        not isinstance(tag, dict)
        or not isinstance(tag.get("id"), str)
        or not tag["id"]
        or type(tag.get("step")) is not int
        or tag["step"] < 0
        or tag.get("decision") not in ROLLOUT_DECISIONS
    ):
        msg = (
            "'rollout' must be an object with 'id' (the rollout's), 'step' (an integer >= 0) "
            f"and 'decision' (one of {', '.join(ROLLOUT_DECISIONS)}), got {tag!r}"
        )
        raise ControlError(INVALID_ROLLOUT, msg, command_id=command_id)
    evidence = tag.get("evidence")
    if evidence is not None and not isinstance(evidence, dict):
        msg = f"'rollout.evidence' must be an object, got {evidence!r}"
        raise ControlError(INVALID_ROLLOUT, msg, command_id=command_id)
    return dict(tag)


def rollout_plan(doc: Any, command_id: str = "") -> RolloutPlan:
    """The :class:`RolloutPlan` of a ``rollout`` command's ``plan``; ControlError
    (``invalid_rollout``) when it is not one. ``confidence`` is ``1 - alpha``.

    >>> plan = rollout_plan({"steps": [0, 0.5, 1], "metric": "accuracy", "min_labels": 50})
    >>> [s.weight for s in plan.steps], plan.metric, plan.alpha, plan.steps[0].min_labels
    ([0.0, 0.5, 1.0], 'accuracy', 0.05, 50)
    >>> try:
    ...     rollout_plan({"steps": [0.5, 0.2]})
    ... except ControlError as exc:
    ...     print(exc.reason)
    invalid_rollout
    """
    if not isinstance(doc, dict):
        msg = f"'plan' must be an object, got {doc!r}"
        raise ControlError(INVALID_ROLLOUT, msg, command_id=command_id)
    known = {"steps", "metric", "margin", "confidence", "min_labels", "max_duration_s"}
    unknown = set(doc) - known - {"on_timeout"}
    if unknown:
        msg = f"unknown plan fields {sorted(unknown)}; known: {sorted(known | {'on_timeout'})}"
        raise ControlError(INVALID_ROLLOUT, msg, command_id=command_id)
    steps = doc.get("steps", [0.0, 0.05, 0.25, 0.5, 1.0])
    numbers = {
        "margin": doc.get("margin", 0.0),
        "confidence": doc.get("confidence", 0.95),
        "max_duration_s": doc.get("max_duration_s", 3600.0),
    }
    try:
        if not isinstance(steps, list) or not all(
            type(w) in (int, float) and math.isfinite(w) for w in steps
        ):
            msg = f"steps must be a list of weights in [0, 1], got {steps!r}"
            raise ValueError(msg)
        for name, value in numbers.items():
            if type(value) not in (int, float) or not math.isfinite(value):
                msg = f"{name} must be a finite number, got {value!r}"
                raise ValueError(msg)
        min_labels = doc.get("min_labels", 500)
        if type(min_labels) is not int:
            msg = f"min_labels must be an integer, got {min_labels!r}"
            raise ValueError(msg)
        if not 0.0 < numbers["confidence"] < 1.0:
            msg = f"confidence must be in (0, 1), got {numbers['confidence']!r}"
            raise ValueError(msg)
        metric, on_timeout = doc.get("metric", "log_loss"), doc.get("on_timeout", "hold")
        if metric not in get_args(Metric):
            msg = f"metric must be one of {', '.join(get_args(Metric))}, got {metric!r}"
            raise ValueError(msg)
        return RolloutPlan.of(
            [float(w) for w in steps],
            min_labels=min_labels,
            max_duration_s=float(numbers["max_duration_s"]),
            on_timeout=on_timeout,
            metric=metric,
            margin=float(numbers["margin"]),
            alpha=round(1.0 - float(numbers["confidence"]), 12),
        )
    except ValueError as exc:
        raise ControlError(INVALID_ROLLOUT, str(exc), command_id=command_id) from None


def _fields(doc: Mapping[str, Any], command_id: str) -> Command:
    name = doc.get("command")
    if name not in COMMANDS:
        msg = f"unknown command {name!r}; known: {', '.join(COMMANDS)}"
        raise ControlError(UNKNOWN_COMMAND, msg, command_id=command_id)
    if name == "status":
        return Command(command_id, name)
    model = _str_field(doc, "model", command_id)
    if name == "rollout":
        action = doc.get("action", "start")
        if action not in ROLLOUT_ACTIONS:
            msg = f"'action' must be one of {', '.join(ROLLOUT_ACTIONS)}, got {action!r}"
            raise ControlError(INVALID_ROLLOUT, msg, command_id=command_id)
        if action == "start":
            candidate = _str_field(doc, "version", command_id)
            plan = doc.get("plan", {})
            rollout_plan(plan, command_id)  # checked here: a bad plan is rejected, not stored
            return Command(command_id, name, model, candidate, action=action, rollout=plan)
        if action in ("hold", "takeover"):
            tag = _rollout_tag(doc.get("rollout"), command_id)
            if tag["decision"] != action:
                msg = f"a {action} carries decision {action!r}, got {tag['decision']!r}"
                raise ControlError(INVALID_ROLLOUT, msg, command_id=command_id)
            return Command(command_id, name, model, action=action, rollout=tag)
        return Command(command_id, name, model, action=action)
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
    """The routing of every model, its history (for rollback), and when it last changed.

    ``seen``: the id of every command that passed authentication: a command id is applied
    once (a second copy, or a replay of a signed command, is rejected ``duplicate_command``),
    whatever became of the first. ``generation`` counts the commands that changed something
    (a route, or a learner reset): a pure function of the log, the same on every worker that
    has read as far (drift policies derive their command ids from it).

    >>> table = RoutingTable.initial({"risk": ("v1", "v2")}, {"risk": "v1"}, now=0.0)
    >>> split = orjson.dumps(
    ...     {"id": "c2", "command": "split", "model": "risk", "weights": {"v1": 0.9, "v2": 0.1}}
    ... )
    >>> table.apply(parse_command(split), now=1.0), table.generation
    (True, 1)
    >>> table.routes["risk"].weights
    (('v1', 0.9), ('v2', 0.1))
    >>> table.apply(parse_command(b'{"id": "c5", "command": "rollback", "model": "risk"}'), 2.0)
    True
    >>> table.routes["risk"] == Route.single("v1"), table.applied
    (True, 2)
    >>> try:  # the same command again
    ...     table.apply(parse_command(split), now=3.0)
    ... except ControlError as exc:
    ...     print(exc.reason, table.routes["risk"] == Route.single("v1"))
    duplicate_command True
    """

    declared: Mapping[str, tuple[str, ...]]
    routes: dict[str, Route]
    history: dict[str, list[Route]] = field(default_factory=dict)
    changed_at: float = 0.0
    applied: int = 0
    seen: set[str] = field(default_factory=set)
    generation: int = 0
    # Per model, its latest rollout (running or finished), as the log has moved it.
    rollouts: dict[str, RolloutRecord] = field(default_factory=dict)

    @classmethod
    def initial(
        cls,
        declared: Mapping[str, tuple[str, ...]],
        serving: Mapping[str, str],
        now: float,
    ) -> RoutingTable:
        """Nothing a worker's own configuration says decides whether a routing command applies
        (beyond the declared models and versions, which every worker must share):
        during a rolling deploy two workers may run different topologies, and their tables
        would diverge. (A rollout's shadow step on a topology without ``topics.shadow`` gathers
        no label, so ``stream-infer rollout`` refuses such a plan before sending it; in the log,
        the step times out as its plan says.)"""
        routes = {model: Route.single(version) for model, version in serving.items()}
        return cls(
            declared=dict(declared),
            routes=routes,
            changed_at=now,
        )

    def apply(self, cmd: Command, now: float) -> bool:
        """Check ``cmd`` and make it the routing in force; whether it changed anything.

        Raises ControlError, and then nothing changes but that ``cmd.id`` is now seen.
        """
        if cmd.id in self.seen:
            msg = f"a command with id {cmd.id!r} was already in the control log"
            raise ControlError(DUPLICATE, msg, command_id=cmd.id)
        self.seen.add(cmd.id)
        routes = self._plan(cmd)
        return self.commit(cmd, routes, now)

    def plan(self, cmd: Command) -> dict[str, Route]:
        """The routes after ``cmd``, without applying it. Raises ControlError if invalid."""
        if cmd.id in self.seen:
            msg = f"a command with id {cmd.id!r} was already in the control log"
            raise ControlError(DUPLICATE, msg, command_id=cmd.id)
        return self._plan(cmd)

    def _plan(self, cmd: Command) -> dict[str, Route]:
        if cmd.if_generation is not None and cmd.if_generation != self.generation:
            msg = (
                f"the command was computed from the routing at generation {cmd.if_generation}; "
                f"the control log has since changed it (generation {self.generation})"
            )
            raise ControlError(STALE, msg, command_id=cmd.id)
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

        running = self.rollouts.get(model)
        if running is not None and running.outcome != "running":
            running = None
        _check_timed(cmd)
        if cmd.command == "rollout":
            return self._plan_rollout(cmd, model, current, running, known)
        if cmd.rollout is not None:  # a driver's step: it must follow the rollout in force
            self._check_step(cmd, model, running)
            if cmd.rollout["decision"] == "abort":
                assert running is not None  # _check_step
                return {**self.routes, model: running.before}
        if cmd.command == "reset_learner":
            # Applied (and counted in the generation) on every worker alike, whatever learners
            # it runs: a worker without that learner says so in its ack (NOT_A_LEARNER).
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
                new = Route.split(cmd.weights or {}, versions)
            except ValueError as exc:
                raise ControlError(INVALID_WEIGHTS, str(exc), command_id=cmd.id) from None
            new = new.with_shadow(None if current.shadow in new.versions else current.shadow)
        elif cmd.command == "shadow":
            if cmd.version and known(cmd.version) in current.versions:
                msg = (
                    f"{model}:{cmd.version} serves already ({dict(current.weights)}): "
                    "a shadow of it would only score it twice"
                )
                raise ControlError(SHADOW_SERVES, msg, command_id=cmd.id)
            new = current.with_shadow(cmd.version or None)
        elif cmd.command == "unshadow":
            new = current.with_shadow(None)
        else:  # rollback
            if not self.history.get(model):
                msg = f"model {model!r} has no earlier routing to roll back to"
                raise ControlError(NOTHING_TO_ROLL_BACK, msg, command_id=cmd.id)
            new = self.history[model][-1]
        return {**self.routes, model: new}

    def _plan_rollout(
        self,
        cmd: Command,
        model: str,
        current: Route,
        running: RolloutRecord | None,
        known: Callable[[str], str],
    ) -> dict[str, Route]:
        """The routes after a ``rollout`` command (start: step 0; hold, resume: unchanged)."""
        if cmd.action == "start":
            candidate = known(cmd.version or "")
            if running is not None:
                msg = f"rollout {running.id} of {model!r} is still running (step {running.step})"
                raise ControlError(ROLLOUT_CONFLICT, msg, command_id=cmd.id)
            if len(current.weights) != 1:
                msg = (
                    f"{model!r} is split ({dict(current.weights)}): a rollout starts from one "
                    "serving version (the incumbent); swap first"
                )
                raise ControlError(ROLLOUT_CONFLICT, msg, command_id=cmd.id)
            incumbent = current.versions[0]
            if candidate == incumbent:
                msg = f"{model}:{candidate} serves already: it cannot be the rollout's candidate"
                raise ControlError(ROLLOUT_CONFLICT, msg, command_id=cmd.id)
            plan = rollout_plan(cmd.rollout, cmd.id)
            order = self.declared[model]
            return {**self.routes, model: step_route(incumbent, candidate, plan, 0, order)}
        if cmd.action in ("hold", "takeover"):
            self._check_step(cmd, model, running)
            return dict(self.routes)
        # resume
        if running is None or not running.held:
            msg = f"{model!r} has no held rollout to resume"
            raise ControlError(ROLLOUT_CONFLICT, msg, command_id=cmd.id)
        return dict(self.routes)

    def _check_step(self, cmd: Command, model: str, running: RolloutRecord | None) -> None:
        tag = cmd.rollout or {}
        if running is None or running.id != tag.get("id"):
            latest = self.rollouts.get(model)
            state = f"{latest.id} is {latest.outcome}" if latest else "there is none"
            msg = f"a step of rollout {tag.get('id')!r}, which is not running ({state})"
            raise ControlError(STALE, msg, command_id=cmd.id)
        step, decision = tag.get("step"), tag.get("decision")
        expected = running.step + 1 if decision == "advance" else running.step
        if step != expected or step >= len(running.plan.steps):
            msg = f"a {decision} at step {step}: rollout {running.id} is at step {running.step}"
            raise ControlError(STALE, msg, command_id=cmd.id)
        if decision == "advance" and running.held:
            msg = f"rollout {running.id} is held at step {running.step}: resume it first"
            raise ControlError(STALE, msg, command_id=cmd.id)
        self._check_body(cmd, running)

    def _check_body(self, cmd: Command, running: RolloutRecord) -> None:
        """A driver's step does what its tag says, as the plan says: an advance routes the
        step's weight (:func:`step_route`), a promote swaps to the candidate at the last step,
        an abort swaps to the incumbent, a hold is a ``rollout`` hold. ControlError otherwise."""
        tag = cmd.rollout or {}
        decision, step = tag.get("decision"), int(tag.get("step", -1))
        model, candidate, incumbent = running.model, running.candidate, running.incumbent
        if decision == "advance":
            order = self.declared[model]
            want = step_route(incumbent, candidate, running.plan, step, order)
            if cmd.command == "split":
                try:
                    got: Route | None = Route.split(cmd.weights or {}, order)
                except ValueError:
                    got = None
            elif cmd.command == "swap":
                got = Route.single(cmd.version or "")
            else:
                got = None
            ok = got is not None and got.weights == want.weights and want.shadow is None
            expected = f"route {want.as_dict()}"
        elif decision == "promote":
            last = len(running.plan.steps) - 1
            ok = cmd.command == "swap" and cmd.version == candidate and step == last
            expected = f"a swap to the candidate {candidate!r} at the last step ({last})"
        elif decision == "abort":
            ok = cmd.command == "swap" and cmd.version == incumbent
            expected = f"a swap to the incumbent {incumbent!r}"
        else:  # hold, takeover: a rollout command of that action
            ok = cmd.command == "rollout" and cmd.action == decision
            expected = f"a rollout {decision}"
        if not ok:
            msg = (
                f"a {decision} at step {step} of rollout {running.id} must be {expected}; "
                f"the command does not match its plan"
            )
            raise ControlError(INVALID_ROLLOUT, msg, command_id=cmd.id)

    def _track_rollout(self, cmd: Command, routes: dict[str, Route], when: float) -> bool:
        """Move the model's rollout record as ``cmd`` says; whether it changed. ``when``: the
        command's time in the log (its ``issued_at``, else its record's time)."""
        model = cmd.model or ""
        record = self.rollouts.get(model)
        # A start or an advance: the routing generation it makes (every rollout change counts
        # one); the labels of events served at it or later are the step's own.
        generation = self.generation + 1
        if cmd.command == "rollout" and cmd.action == "start":
            current = self.routes[model]
            self.rollouts[model] = RolloutRecord(
                id=cmd.id,
                model=model,
                candidate=cmd.version or "",
                incumbent=current.versions[0],
                plan=rollout_plan(cmd.rollout, cmd.id),
                plan_doc=dict(cmd.rollout or {}),
                before=current,
                started_at=when,
                step_started_at=when,
                step_began_at=when,
                step_clock_origin=when,
                step_generation=generation,
                last_command=cmd.id,
                decisions=(_decision(cmd, "start", 0, routes[model], when),),
            )
            return True
        if record is None or record.outcome != "running":
            return False
        if cmd.command == "rollout" and cmd.action == "resume":
            decision = _decision(cmd, "resume", record.step, routes[model], when)
            self.rollouts[model] = replace(
                record,
                held=False,
                step_started_at=when,
                step_clock_origin=when,
                last_command=cmd.id,
                decisions=(*record.decisions, decision),
            )
            return True
        tag = (
            cmd.rollout if cmd.command != "rollout" or cmd.action in ("hold", "takeover") else None
        )
        if tag is None:  # an operator's (or a policy's) routing change of this model: it wins
            if cmd.command in NO_ROUTING_CHANGE or routes[model] == self.routes[model]:
                return False
            decision = _decision(cmd, "cancelled", record.step, routes[model], when)
            self.rollouts[model] = replace(
                record,
                outcome="cancelled",
                cancelled_by=cmd.id,
                last_command=cmd.id,
                decisions=(*record.decisions, decision),
            )
            return True
        kind = str(tag["decision"])
        evidence = tag.get("evidence") if isinstance(tag.get("evidence"), dict) else None
        changes: dict[str, Any] = {
            "last_command": cmd.id,
            "evidence": evidence if evidence is not None else record.evidence,
            "decisions": (
                *record.decisions,
                _decision(cmd, kind, int(tag["step"]), routes[model], when, tag.get("reason")),
            ),
        }
        if kind == "advance":
            changes |= {"step": int(tag["step"]), "step_started_at": when, "held": False}
            changes["step_began_at"] = changes["step_clock_origin"] = when
            changes["step_generation"] = generation
            changes["base"] = evidence_counts(evidence)
        elif kind == "hold":
            changes["held"] = True
        elif kind == "takeover":
            # A driving session begins: its step clock starts again, but never past one more
            # max_duration after the step began (or was resumed): drivers replaced again and
            # again cannot keep a step from timing out.
            limit = record.step_clock_origin + record.plan.steps[record.step].max_duration_s
            changes |= {"sessions": record.sessions + 1, "step_started_at": min(when, limit)}
        else:
            changes["outcome"] = "promoted" if kind == "promote" else "aborted"
        self.rollouts[model] = replace(record, **changes)
        return True

    def commit(self, cmd: Command, routes: dict[str, Route], now: float) -> bool:
        """Make ``routes`` (from :meth:`plan`) the routing in force; whether anything changed.

        A command that changes no route pushes no history and is not counted in ``applied``.
        A rollout's state that moves (started, a step, held, resumed, finished, cancelled)
        counts in ``generation`` even when no route changes.
        """
        self.seen.add(cmd.id)
        # Never this machine's clock: two workers that apply the same log an hour apart, or a
        # replay, hold the same record (a rollout's own commands without a time are rejected).
        when = _when(cmd)
        rollout_moved = cmd.model in self.routes and self._track_rollout(
            cmd, routes, when if when is not None else 0.0
        )
        if cmd.command in NO_ROUTING_CHANGE:
            if cmd.command == "reset_learner":
                self.generation += 1
                return True
            return False
        model = cmd.model or ""
        if routes[model] == self.routes[model]:
            if rollout_moved:
                self.generation += 1
            return rollout_moved
        if cmd.command == "rollback":
            self.history[model].pop()
        else:
            self.history.setdefault(model, []).append(self.routes[model])
        self.routes = routes
        self.changed_at = now
        self.applied += 1
        self.generation += 1
        return True

    def as_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "routes": {m: r.as_dict() for m, r in sorted(self.routes.items())},
            "changed_at": self.changed_at,
            "applied": self.applied,
        }
        if self.rollouts:  # only once the log has a rollout: older readers see what they knew
            doc["rollouts"] = {m: r.as_dict() for m, r in sorted(self.rollouts.items())}
        return doc


@dataclass(frozen=True)
class RolloutRecord:
    """A rollout as the control log has moved it: the same on every worker that has read as
    far. ``base``: each version's label count when the current step began (from the evidence
    the step's command carried); ``evidence``: the last evidence a step command carried."""

    id: str
    model: str
    candidate: str
    incumbent: str
    plan: RolloutPlan
    plan_doc: dict[str, Any]
    before: Route  # what served before the rollout: an abort routes it again
    started_at: float
    step_started_at: float  # the step's clock (max_duration): a resume starts it again
    last_command: str
    step: int = 0
    # When the step began (its command's issued_at; a resume does not move it): the labels of
    # events served since then are the step's own.
    step_began_at: float = 0.0
    # When the step began or an operator last resumed it: a takeover restarts the step's clock
    # at most up to this plus the step's max_duration (a step lasts at most twice that).
    step_clock_origin: float = 0.0
    # The routing generation the step's command made: a step's labels are those of events
    # served by a routing of this generation or later (what served them, not when).
    step_generation: int = 0
    # Driving sessions begun (each with a logged takeover): session k's gate runs at level
    # alpha_k = alpha * 6 / (pi^2 k^2), so all of them together spend at most alpha.
    sessions: int = 0
    held: bool = False
    outcome: str = "running"  # running, promoted, aborted, cancelled
    base: tuple[int, int] = (0, 0)  # (candidate, incumbent) labels when the step began
    evidence: dict[str, Any] | None = None
    cancelled_by: str | None = None
    decisions: tuple[dict[str, Any], ...] = ()

    @property
    def weight(self) -> float:
        """The candidate's traffic share at the current step (0: shadow)."""
        if self.outcome == "promoted":
            return 1.0
        if self.outcome in ("aborted", "cancelled"):
            return 0.0
        return self.plan.steps[self.step].weight

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "candidate": self.candidate,
            "incumbent": self.incumbent,
            "plan": self.plan_doc,
            "step": self.step,
            "weight": self.weight,
            "held": self.held,
            "outcome": self.outcome,
            "started_at": self.started_at,
            "step_started_at": self.step_started_at,
            "step_began_at": self.step_began_at,
            "step_clock_origin": self.step_clock_origin,
            "step_generation": self.step_generation,
            "sessions": self.sessions,
            "evidence": self.evidence,
            "cancelled_by": self.cancelled_by,
            "decisions": list(self.decisions[-20:]),
        }


def _check_timed(cmd: Command) -> None:
    """A rollout's own commands must have a time in the log; ControlError if not."""
    if (cmd.command == "rollout" or cmd.rollout is not None) and _when(cmd) is None:
        msg = (
            "a rollout's commands carry 'issued_at' (or come from the control log, whose "
            "record time stands in): its record's times are the log's, the same everywhere"
        )
        raise ControlError(INVALID_ROLLOUT, msg, command_id=cmd.id)


def _when(cmd: Command) -> float | None:
    """A command's time in the log: its ``issued_at``, else its record's timestamp."""
    return cmd.issued_at if cmd.issued_at is not None else cmd.logged_at


def _decision(
    cmd: Command, kind: str, step: int, route: Route, when: float, reason: Any = None
) -> dict[str, Any]:
    out = {"command_id": cmd.id, "decision": kind, "step": step, "at": when}
    out["routing"] = route.as_dict()
    if reason is not None:
        out["reason"] = str(reason)
    return out


def evidence_counts(evidence: Mapping[str, Any] | None) -> tuple[int, int]:
    """The (candidate, incumbent) label counts in a step's evidence (0 when absent)."""
    if not evidence:
        return (0, 0)
    out = []
    for side in ("candidate", "incumbent"):
        part = evidence.get(side)
        labels = part.get("labels") if isinstance(part, Mapping) else None
        out.append(labels if type(labels) is int and labels >= 0 else 0)
    return out[0], out[1]


def step_route(
    incumbent: str, candidate: str, plan: RolloutPlan, step: int, order: Sequence[str]
) -> Route:
    """The routing of a rollout's ``step``: weight 0 shadows the candidate beside the
    incumbent; a weight in (0, 1) splits (versions in the model's declared ``order``, as a
    ``split`` command's, so the keys stay sticky from this step to the driver's next ones);
    weight 1 serves the candidate alone.

    >>> plan = RolloutPlan.of([0.0, 0.25, 1.0])
    >>> step_route("v1", "v2", plan, 0, ("v1", "v2")).as_dict()
    {'weights': {'v1': 1.0}, 'shadow': 'v2'}
    >>> step_route("v2", "v1", plan, 1, ("v1", "v2")).as_dict()
    {'weights': {'v1': 0.25, 'v2': 0.75}, 'shadow': None}
    """
    weight = plan.steps[step].weight
    if weight == 0.0:
        return Route.single(incumbent).with_shadow(candidate)
    return Route.split({incumbent: round(1.0 - weight, 12), candidate: weight}, order)


def required_versions(routes: Mapping[str, Route]) -> set[ModelVersion]:
    """Every (model, version) the routes need loaded: serving and shadow."""
    needed: set[ModelVersion] = set()
    for model, route in routes.items():
        needed.update(ModelVersion(model, v) for v in route.versions)
        if route.shadow:
            needed.add(ModelVersion(model, route.shadow))
    return needed


def encode_ack(
    *,
    command_id: str | None,
    command: str | None,
    worker: str,
    table: RoutingTable,
    error: ControlError | None,
    now: float,
    not_loaded: str | None = None,
    serving: Mapping[str, Route] | None = None,
    rollout_driver: Mapping[str, Any] | None = None,
) -> bytes:
    """One worker's answer. ``not_loaded``: the command is applied to the routing table (as
    on every worker) but this worker cannot load what it routes; ``serving`` is then the
    routing it still serves (the last it could load, if any). ``rollout_driver``: the worker
    that drives rollouts adds its live view (``"rollout_driver"``: its evidence so far and its
    last decision, per running rollout)."""
    applied, rejected, not_loaded_status = STATUSES
    status = rejected if error else not_loaded_status if not_loaded else applied
    doc: dict[str, Any] = {
        "command_id": command_id,
        "command": command,
        "worker": worker,
        "status": status,
        "routing": table.as_dict(),
        "ts": now,
    }
    if error is not None:
        doc["reason"] = error.reason
        doc["detail"] = error.detail
    elif not_loaded:
        doc["reason"] = ARTIFACT_INVALID
        doc["detail"] = not_loaded
        doc["serving"] = {m: r.as_dict() for m, r in sorted((serving or {}).items())}
    if rollout_driver:
        doc["rollout_driver"] = dict(rollout_driver)
    return orjson.dumps(doc)
