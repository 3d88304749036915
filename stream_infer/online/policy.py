"""What to do about drift: a policy turns a DriftEvent into control commands.

A :class:`Policy` names a signal (as in ``SIGNALS``), an action (``POLICY_ACTIONS``; both
defined in :mod:`stream_infer.online`) and optionally the model it is for (None: every model).
:func:`commands_for` returns the command documents to produce to the control topic (the format
of ``stream_infer.core.control``), or ``[]`` when nothing is to be done. It decides from the
routes in force; the workers still validate each command as they would an operator's.

Command ids (:func:`stream_infer.core.control.derived_command_id`): ``drift-`` and 32 hex
digits of a hash of the command and of the routing table's ``generation`` (the count of changes
the control log has made, the same on every worker that has read it as far). Every worker that
sees the drift (each sees its own partitions, so each may alarm) mints the same id for the same
command, and the table applies one copy: the rest are ``duplicate_command``. Each command also
carries ``if_generation``: a copy computed from an older routing (a worker that had not read as
far, a late delivery, a routing the operator changed since) is rejected ``stale`` rather than
undoing what came after it. After the command applies, the generation moves on, so the next
drift's command gets a new id.

Direction: on the ``error`` signal, only a rise acts (the error got worse); a fall (a version
or a freshly reset learner getting better) is only an alert. ``prediction`` and feature
drift act in either direction.

Actions:

* ``alert``: no command (the DriftEvent itself is the alert).
* ``rollback_canary``: if the drifting version serves less than the largest weight of its
  model's split, ``swap`` the model to the version with the largest weight (the first in route
  order on a tie). The model's sole serving version, a version that is the largest (or equal
  largest) share of a split, a shadow, or a version that does not serve: no command (the drift
  event alerts).
* ``shift_to_online``: ``swap`` the model to ``online_version`` when a serving version other
  than ``online_version`` drifts; no command for a shadow, for the online version itself, or
  when the online version already serves alone.
* ``reset_learner``: ``reset_learner`` of ``online_version`` of the model, whichever of the
  model's versions drifted (a shadow included: the online learner often runs as one).

Input drift (a ``feature:<name>`` signal) is of no one model or version (its events name model
and version ``*``): only ``alert``, and ``reset_learner`` of a policy that names its ``model``,
act on it; a policy that pairs it with another action, or resets without a model, is refused
(:func:`policy_problem`).

A canary that drifts is rolled back to the version with the largest weight:

>>> from stream_infer.core.routing import Route
>>> policy = Policy("error", "rollback_canary")
>>> event = DriftEvent("risk", "v2", "adwin", "error", at=223, ts=0.0, estimation=0.4,
...                    width=56, previous=0.1)
>>> route = Route(weights=(("v1", 0.9), ("v2", 0.1)))
>>> [cmd] = commands_for(policy, event, {"risk": route}, generation=7)
>>> cmd["command"], cmd["version"], cmd["if_generation"], cmd["id"].startswith("drift-")
('swap', 'v1', 7, True)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stream_infer.core.control import derived_command_id
from stream_infer.core.routing import Route
from stream_infer.online import POLICY_ACTIONS, PolicyAction, parse_signal
from stream_infer.online.drift import DriftEvent

_NEEDS_ONLINE_VERSION = ("shift_to_online", "reset_learner")
# What a drift event of a feature signal names as its model and version.
ANY = "*"


def policy_problem(signal: str, action: str, model: str | None) -> str | None:
    """Why this signal and action make no policy (None when they do)."""
    kind, _name = parse_signal(signal)
    if kind != "feature":
        return None
    if action in ("rollback_canary", "shift_to_online"):
        return (
            f"action {action!r} on signal {signal!r}: input drift is of no one version, so "
            "there is no canary to roll back or version to move from; use alert, or "
            "reset_learner with a model"
        )
    if action == "reset_learner" and model is None:
        return (
            f"action 'reset_learner' on signal {signal!r} needs `model`: input drift is of no "
            "one model"
        )
    return None


@dataclass(frozen=True)
class Policy:
    """On drift of ``signal`` (of ``model``, or of any model when None), do ``action``."""

    signal: str
    action: PolicyAction
    model: str | None = None
    online_version: str | None = None

    def __post_init__(self) -> None:
        parse_signal(self.signal)
        if self.action not in POLICY_ACTIONS:
            msg = f"Policy: action must be one of {', '.join(POLICY_ACTIONS)}; got {self.action!r}"
            raise ValueError(msg)
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            msg = f"Policy: model must be None or a non-empty string, got {self.model!r}"
            raise ValueError(msg)
        if self.action in _NEEDS_ONLINE_VERSION:
            if not isinstance(self.online_version, str) or not self.online_version:
                msg = f"Policy: action {self.action!r} needs online_version (a version name)"
                raise ValueError(msg)
        elif self.online_version is not None:
            msg = f"Policy: online_version is only used by {', '.join(_NEEDS_ONLINE_VERSION)}"
            raise ValueError(msg)
        if problem := policy_problem(self.signal, self.action, self.model):
            raise ValueError(f"Policy: {problem}")

    def matches(self, event: DriftEvent) -> bool:
        """Whether this policy is about ``event``: same signal, and same model if it names one
        (input drift, of model ``*``, is about every model)."""
        if event.signal != self.signal:
            return False
        return event.model == ANY or self.model in (None, event.model)


def _command(command: str, generation: int, **fields: Any) -> dict[str, Any]:
    body = {"command": command, **fields, "if_generation": generation}
    return {"id": derived_command_id(body, generation), **body}


def commands_for(
    policy: Policy, event: DriftEvent, routes: Mapping[str, Route], *, generation: int = 0
) -> list[dict[str, Any]]:
    """The control commands ``policy`` asks for on ``event`` given the routes in force and the
    routing table's ``generation`` (which the ids derive from)."""
    if not policy.matches(event) or policy.action == "alert":
        return []
    if event.signal == "error" and event.rose is not True:
        return []  # the error fell (a version or a fresh learner getting better): no action
    model = policy.model if event.model == ANY else event.model
    if model is None or model == ANY:
        return []  # input drift, and no model named: refused at load (policy_problem)
    if policy.action == "reset_learner":
        return [_command("reset_learner", generation, model=model, version=policy.online_version)]
    route = routes.get(model)
    if route is None or event.version not in route.versions:
        return []  # a shadow, a version that does not serve, or a model not routed here
    if policy.action == "rollback_canary":
        if len(route.weights) == 1:
            # A sole version is no canary. A "rollback" here could undo the very swap that
            # retired the canary, and every worker that saw the drift would send one, walking
            # the history back several steps: only the idempotent swap is automated.
            return []
        top_version, top_weight = max(route.weights, key=lambda vw: vw[1])
        if dict(route.weights)[event.version] < top_weight:
            return [_command("swap", generation, model=model, version=top_version)]
        return []
    # shift_to_online
    online = policy.online_version
    if event.version == online or route.versions == (online,):
        return []
    return [_command("swap", generation, model=model, version=online)]
