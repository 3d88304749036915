"""Label-driven rollouts on a real broker, two workers: a better version is promoted step by
step, a worse one is aborted back to the incumbent, and a driver SIGKILLed mid-rollout is
replaced by the other worker, which continues from the control log. Nothing is lost, and every
step is in the control log and acknowledged by the workers."""

from __future__ import annotations

import socket
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest

from stream_infer.examples import phishing
from stream_infer.io.clients import consume_ready
from stream_infer.io.controller import Controller, new_command
from tests.integration.conftest import MODELS, Setup, scrape
from tests.integration.test_control import start_group

# Small gates so a rollout takes seconds: the accuracy of v1 and v2 is about 0.93 on these
# events, v3-degraded's about 0.52.
PLAN = {"metric": "accuracy", "margin": 0.1, "confidence": 0.95, "min_labels": 100}


def rollout_setup(make_setup: Any) -> Setup:
    setup: Setup = make_setup(
        online={"rollouts": True},
        models=[
            {
                "name": "risk",
                "serving": "v1",
                "versions": [
                    {"version": v, "path": str(MODELS / v)} for v in ("v1", "v2", "v3-degraded")
                ],
            }
        ],
    )
    return setup


class Traffic:
    """Events with their labels (same key: the same partition, so the worker that serves an
    event joins its label), in chunks."""

    def __init__(self, setup: Setup, prefix: str) -> None:
        self.setup, self.prefix = setup, prefix
        self.rows = phishing.events(seed=11)
        self.ids: list[str] = []

    def chunk(self, n: int) -> list[str]:
        events, labels, ids = [], [], []
        for _ in range(n):
            _, feats, label = next(self.rows)
            i = len(self.ids) + len(ids)
            event_id, key = f"{self.prefix}-{i}", f"k-{i % 997}".encode()
            events.append((key, orjson.dumps({"id": event_id, "features": feats})))
            labels.append((key, orjson.dumps({"id": event_id, "label": label})))
            ids.append(event_id)
        self.setup.produce(events)
        self.setup.produce(labels, topic=self.setup.topics.labels)
        self.ids += ids
        return ids


class Audit:
    """The control log and the acks topic, read from the beginning."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self._control = setup.consumer(setup.topics.control)
        self._acks = setup.consumer(setup.topics.acks)
        self.commands: list[dict[str, Any]] = []
        self.acks: dict[str, list[dict[str, Any]]] = defaultdict(list)

    def read(self) -> None:
        for consumer, sink in ((self._control, self.commands), (self._acks, None)):
            for msg in consume_ready(consumer, 1000, 0.2):
                if msg.error() is not None:
                    continue
                doc = orjson.loads(msg.value())
                if sink is not None:
                    sink.append(doc)
                else:
                    self.acks[str(doc.get("command_id"))].append(doc)

    def settle(self, timeout_s: float = 15.0) -> None:
        """Read until every acknowledged command is also read from the control log (the two
        topics are read apart: one may be ahead)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.read()
            if set(self.acks) - {"None"} <= {str(d.get("id")) for d in self.commands}:
                return
        raise AssertionError(f"acked commands not in the control log: {set(self.acks)}")

    def steps(self, rollout_id: str, *, takeovers: bool = False) -> list[dict[str, Any]]:
        """The rollout's step commands that the workers applied, in log order (with
        ``takeovers``: its drivers' takeovers instead, which begin each driving session)."""
        out = []
        for doc in self.commands:
            tag = doc.get("rollout")
            if not isinstance(tag, dict) or tag.get("id") != rollout_id:
                continue
            if (tag.get("decision") == "takeover") != takeovers:
                continue
            if any(a["status"] == "applied" for a in self.acks.get(doc["id"], [])):
                out.append(doc)
        return out

    def outcome(self, rollout_id: str) -> dict[str, Any] | None:
        """The rollout's record in the newest ack that has it."""
        latest: tuple[float, dict[str, Any]] | None = None
        for acks in self.acks.values():
            for ack in acks:
                record = ack["routing"].get("rollouts", {}).get("risk")
                if (
                    record
                    and record["id"] == rollout_id
                    and (latest is None or ack["ts"] > latest[0])
                ):
                    latest = (ack["ts"], record)
        return latest[1] if latest else None

    def close(self) -> None:
        self._control.close()
        self._acks.close()


@pytest.fixture
def make_audit() -> Iterator[Callable[[Setup], Audit]]:
    """Audits whose consumers are closed however the test ends (before the broker stops)."""
    made: list[Audit] = []

    def make(setup: Setup) -> Audit:
        made.append(Audit(setup))
        return made[-1]

    yield make
    for audit in made:
        audit.close()


def start_rollout(setup: Setup, candidate: str, steps: list[float]) -> str:
    ctl = Controller(setup.topology)
    try:
        sent = ctl.send(
            new_command("rollout", model="risk", version=candidate, plan=PLAN | {"steps": steps})
        )
        acks = ctl.acks(sent["id"], wait_s=30, workers=2)
    finally:
        ctl.close()
    assert {a["status"] for a in acks} == {"applied"} and len(acks) == 2, acks
    return str(sent["id"])


def run_until(
    setup: Setup,
    traffic: Traffic,
    audit: Audit,
    rollout_id: str,
    done: Any,
    timeout_s: float = 90.0,
) -> dict[str, Any]:
    """Feed events and labels until ``done(record)`` holds for the rollout's record."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        traffic.chunk(100)
        time.sleep(0.3)
        audit.read()
        record = audit.outcome(rollout_id)
        if record is not None and done(record):
            audit.settle()
            return record
    raise AssertionError(
        f"rollout {rollout_id} not done in {timeout_s}s: {audit.outcome(rollout_id)}\n"
        + setup.worker_logs()
    )


def every_step_acknowledged(audit: Audit, steps: list[dict[str, Any]], workers: set[str]) -> None:
    for doc in steps:
        answered = {a["worker"] for a in audit.acks[doc["id"]] if a["status"] == "applied"}
        assert workers <= answered, (doc["id"], answered)


def nothing_lost(setup: Setup, traffic: Traffic) -> list[dict[str, Any]]:
    preds = setup.collect_until_ids(setup.topics.predictions, set(traffic.ids), timeout_s=90)
    assert set(traffic.ids) <= {p["id"] for p in preds}
    return preds


def test_a_better_version_reaches_all_traffic_step_by_step(
    make_setup: Any, make_audit: Any
) -> None:
    setup = rollout_setup(make_setup)
    start_group(setup)
    audit, traffic = make_audit(setup), Traffic(setup, "b")
    rollout_id = start_rollout(setup, "v2", [0, 0.5, 1])
    record = run_until(setup, traffic, audit, rollout_id, lambda r: r["outcome"] != "running")
    assert record["outcome"] == "promoted", record
    steps = audit.steps(rollout_id)
    assert [(d["command"], d["rollout"]["decision"], d["rollout"]["step"]) for d in steps] == [
        ("split", "advance", 1),
        ("split", "advance", 2),
        ("swap", "promote", 2),
    ]
    assert steps[0]["weights"] == {"v2": 0.5, "v1": 0.5}
    # each gate passed on evidence: at least min_labels per version, bounds under the margin
    for doc in steps:
        evidence = doc["rollout"]["evidence"]
        assert evidence["candidate"]["labels"] >= PLAN["min_labels"]
        assert evidence["difference"]["upper"] < PLAN["margin"]
    workers = {a["worker"] for a in audit.acks[rollout_id]}
    assert len(workers) == 2
    every_step_acknowledged(audit, steps, workers)
    last = audit.acks[steps[-1]["id"]]
    assert all(a["routing"]["routes"]["risk"]["weights"] == {"v2": 1.0} for a in last)
    tail = traffic.chunk(200)
    preds = nothing_lost(setup, traffic)
    assert {p["version"] for p in preds if p["id"] in set(tail)} == {"v2"}


def test_a_worse_version_is_aborted_and_traffic_returns_to_the_incumbent(
    make_setup: Any,
    make_audit: Any,
) -> None:
    setup = rollout_setup(make_setup)
    start_group(setup)
    audit, traffic = make_audit(setup), Traffic(setup, "w")
    rollout_id = start_rollout(setup, "v3-degraded", [0, 0.05, 0.5, 1])
    record = run_until(setup, traffic, audit, rollout_id, lambda r: r["outcome"] != "running")
    assert record["outcome"] == "aborted", record
    steps = audit.steps(rollout_id)
    assert [(d["command"], d["rollout"]["decision"], d["rollout"]["step"]) for d in steps] == [
        ("swap", "abort", 0)  # at its first gate: it never served an event
    ]
    assert steps[0]["rollout"]["evidence"]["difference"]["lower"] > PLAN["margin"]
    workers = {a["worker"] for a in audit.acks[rollout_id]}
    every_step_acknowledged(audit, steps, workers)
    for ack in audit.acks[steps[0]["id"]]:
        assert ack["routing"]["routes"]["risk"] == {"weights": {"v1": 1.0}, "shadow": None}
    tail = traffic.chunk(200)
    preds = nothing_lost(setup, traffic)
    assert {p["version"] for p in preds} == {"v1"}  # the candidate only ever shadowed
    assert {p["version"] for p in preds if p["id"] in set(tail)} == {"v1"}


def test_a_driver_killed_mid_rollout_is_replaced_and_the_rollout_goes_on(
    make_setup: Any,
    make_audit: Any,
) -> None:
    setup = rollout_setup(make_setup)
    ports = start_group(setup)
    audit, traffic = make_audit(setup), Traffic(setup, "k")
    rollout_id = start_rollout(setup, "v2", [0, 0.25, 0.5, 1])
    run_until(setup, traffic, audit, rollout_id, lambda r: r["step"] >= 1)
    drivers = [i for i, port in enumerate(ports) if scrape(port, "stream_infer_rollout_driver")]
    assert len(drivers) == 1, drivers
    killed = drivers[0]
    old_driver = f"{socket.gethostname()}-{setup.workers[killed].pid}"  # the worker's id
    setup.workers[killed].kill()  # SIGKILL: no drain, no goodbye
    setup.workers[killed].wait(10)
    record = run_until(
        setup, traffic, audit, rollout_id, lambda r: r["outcome"] != "running", timeout_s=90
    )
    assert record["outcome"] == "promoted", record
    steps = audit.steps(rollout_id)
    decisions = [(d["rollout"]["decision"], d["rollout"]["step"]) for d in steps]
    assert decisions == [("advance", 1), ("advance", 2), ("advance", 3), ("promote", 3)]
    # the killed driver's steps, then only the survivor's (whatever the old one did between
    # the read and the kill is still its own)
    before = [d for d in steps if d["rollout"]["driver"] == old_driver]
    after = steps[len(before) :]
    assert before and before == steps[: len(before)], [d["rollout"]["driver"] for d in steps]
    assert after and all(d["rollout"]["driver"] != old_driver for d in after)
    # each driving session began with a takeover in the log: the killed driver's, then the
    # survivor's (its step clock restarted, its gate at the second session's level)
    takeovers = [d["rollout"]["driver"] for d in audit.steps(rollout_id, takeovers=True)]
    assert old_driver in takeovers and takeovers[-1] != old_driver, takeovers
    assert record["sessions"] == len(takeovers) >= 2, record
    # the new driver went on from the evidence the log carried, not from nothing
    first_new = after[0]["rollout"]
    assert first_new["restored"] is True
    carried = before[-1]["rollout"]["evidence"]
    for side in ("candidate", "incumbent"):
        assert first_new["evidence"][side]["labels"] > carried[side]["labels"]
    survivor = {a["worker"] for a in audit.acks[after[-1]["id"]]}
    assert len(survivor) == 1
    every_step_acknowledged(audit, after, survivor)
    nothing_lost(setup, traffic)
