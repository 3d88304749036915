"""Faults only a real cluster makes possible.

- Three KRaft nodes, topics replicated three times with ``min.insync.replicas=2``: under steady
  load the leader of an input partition, the leader of a prediction partition and the active
  controller are SIGKILLed one after the other, each restarted on its data before the next.
- One broker with its data on disk, stopped mid-stream (SIGTERM or SIGKILL) and started again
  on the same ports and data.
- The launcher: a broker never outlives the process that started it, and ``stop()`` leaves
  neither a process nor its temporary folder.

In all of them the worker is one process that must ride the fault out: nothing lost (every
event id gets a prediction), every duplicate counted and bounded, no restart, no crash.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from stream_infer.examples import phishing
from stream_infer.io.clients import consume_ready, producer_config
from stream_infer.local.apache_kafka import KafkaCluster
from stream_infer.local.loadgen import OpenLoopProducer
from stream_infer.local.tansu import free_port
from tests.brokers import require_local_kafka
from tests.integration.conftest import Setup

BATCHING = {"max_batch_size": 64, "max_wait_ms": 5, "max_batches_in_flight": 4}
IN_FLIGHT = BATCHING["max_batch_size"] * BATCHING["max_batches_in_flight"]
AUTO_COMMIT_INTERVAL_S = 0.5  # consumer_config's auto.commit.interval.ms
COMMIT_SLACK_S = 0.5  # a consumer-loop turn, the commit's round trip, a loaded 2-core machine
SETTLE_S = 2.0  # steady load before each fault
# What marks a worker that crashed or restarted something inside (faust's supervisor logs
# "Crashed", the serve agent logs CRITICAL before it stops the worker).
CRASH_MARKS = ("CRITICAL", "Crashed", "Traceback", "the batch source failed")


def stamped_events(prefix: str = "e") -> Iterator[tuple[bytes, bytes]]:
    """Valid events `{prefix}-0`, `{prefix}-1`, ... each stamped with its send time (`ts`)."""
    rows = phishing.events(seed=7)
    i = 0
    while True:
        _, feats, _ = next(rows)
        doc = {"id": f"{prefix}-{i}", "features": feats, "ts": time.time()}
        yield f"k-{i % 997}".encode(), orjson.dumps(doc)
        i += 1


# Every record is stamped by the partition leader that appends it (LogAppendTime): when a
# prediction became readable, and when its event reached the input topic, whatever the test's
# reader was doing meanwhile (it does not read while it restarts a node).
APPEND_TIME = {"log.message.timestamp.type": "LogAppendTime"}


def steady_load(cluster: KafkaCluster, setup: Setup, rate: float) -> OpenLoopProducer:
    """An idempotent open-loop producer of stamped events to the input topic, started."""
    conf = {
        "bootstrap.servers": cluster.bootstrap_servers,
        "enable.idempotence": True,
        "message.timeout.ms": 120_000,
    }
    return OpenLoopProducer(conf, setup.topics.input, stamped_events(), rate=rate).start()


@dataclass(frozen=True, slots=True)
class Arrival:
    appended: float  # when the prediction was appended (the leader's clock, epoch seconds)
    partition: int
    event_id: str
    sent: float  # the event's ts: when the load generator produced it


class Flow:
    """Reads the prediction topic from the beginning and remembers when each record came."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.consumer = _reader(setup, setup.topics.predictions)
        self.seen: Counter[str] = Counter()
        self.arrivals: list[Arrival] = []
        self._offsets: set[tuple[int, int]] = set()
        self.read_twice = 0  # one record handed to this reader twice (not a duplicate)

    def read(self, seconds: float) -> int:
        got = 0
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            for msg in consume_ready(self.consumer, 1000, min(left, 0.1)):
                value = msg.value()
                if msg.error() is None and value is not None:
                    where = (msg.partition() or 0, msg.offset() or 0)
                    if where in self._offsets:
                        self.read_twice += 1
                        continue
                    self._offsets.add(where)
                    doc = orjson.loads(value)
                    self.seen[doc["id"]] += 1
                    appended = msg.timestamp()[1] / 1000.0
                    self.arrivals.append(
                        Arrival(appended, msg.partition() or 0, doc["id"], doc["ts"])
                    )
                    got += 1
            worker = self.setup.workers[0]
            assert worker.poll() is None, "the worker exited:\n" + self.setup.worker_logs()
        return got

    def read_until(self, done: Callable[[], bool], timeout_s: float, what: str) -> float:
        """Read until `done()`; the seconds it took."""
        started = time.monotonic()
        while not done():
            waited = time.monotonic() - started
            assert waited < timeout_s, f"{what}: not within {timeout_s:.0f} s"
            self.read(0.1)
        return time.monotonic() - started

    def caught_up(self, load: OpenLoopProducer, behind_s: float = 0.5) -> Callable[[], bool]:
        """True once the last 200 ids sent up to `behind_s` ago have a prediction (they cover
        every partition, each served in order)."""

        def done() -> bool:
            due = load.sent - int(load.rate * behind_s)
            return all(f"e-{i}" in self.seen for i in range(max(0, due - 200), due))

        return done

    def drain(self, quiet_s: float = 1.0) -> None:
        while self.read(quiet_s):
            pass

    def dump(self, path: Path) -> None:
        """Every arrival as CSV, for a look after a failure."""
        rows = (f"{a.appended:.3f},{a.partition},{a.event_id},{a.sent:.3f}" for a in self.arrivals)
        path.write_text("appended,partition,id,sent\n" + "\n".join(rows) + "\n")

    def first_copies(self) -> dict[str, Arrival]:
        firsts: dict[str, Arrival] = {}
        for a in self.arrivals:
            firsts.setdefault(a.event_id, a)
        return firsts

    def close(self) -> None:
        self.consumer.close()


def _reader(setup: Setup, topic: str) -> Consumer:
    """A consumer of every partition of the topic, from the beginning. By number: on a cluster
    the node asked first may not know a topic created a moment ago, and assigning from its
    metadata (conftest's Setup.consumer) would assign nothing."""
    consumer = Consumer(
        {"bootstrap.servers": setup.bootstrap, "group.id": "it-reader"}
        | {"enable.auto.commit": False}
    )
    parts = range(setup.topics.partitions)
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    return consumer


def read_inputs(setup: Setup, count: int, timeout_s: float = 60.0) -> dict[str, list[float]]:
    """Each event id of the input topic (``count`` of them) and when each copy (a distinct
    offset) was appended. Copies are counted, not assumed away: runs before records were told
    apart by offset found 1 and 3 input events twice across leader kills."""
    consumer = _reader(setup, setup.topics.input)
    out: dict[str, list[float]] = {}
    offsets: set[tuple[int, int]] = set()
    deadline = time.monotonic() + timeout_s
    quiet_until = float("inf")
    try:
        while time.monotonic() < min(deadline, quiet_until):
            for msg in consume_ready(consumer, 1000, 0.2):
                value = msg.value()
                where = (msg.partition() or 0, msg.offset() or 0)
                if msg.error() is None and value is not None and where not in offsets:
                    offsets.add(where)
                    event_id = orjson.loads(value)["id"]
                    out.setdefault(event_id, []).append(msg.timestamp()[1] / 1000.0)
                    quiet_until = time.monotonic() + 1.0 if len(out) >= count else quiet_until
    finally:
        consumer.close()
    assert len(out) == count, f"read {len(out)} distinct input events of {count}"
    return out


@dataclass
class Fault:
    """One stop of one node and what the worker saw of it. Times are epoch seconds."""

    what: str
    node: int
    at: float
    recovered_at: float = 0.0  # the worker had caught up with the load again
    until: float = float("inf")  # the next fault (duplicates appended before it are its own)
    restart_s: float = 0.0  # start_node, and (cluster) until every replica is back in sync
    worker_s: float = 0.0  # longest time from an event's append to its prediction's
    producer_s: float = 0.0  # longest time from an event's send to its append (load generator)
    gap_s: float = 0.0  # longest silence of one prediction partition
    duplicates: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def measure(self, flow: Flow, inputs: dict[str, list[float]]) -> None:
        """From the kill (a second before: batches then in flight) until the worker had caught
        up again."""
        first = flow.first_copies()
        near = [a for a in first.values() if self.at - 1.0 <= inputs[a.event_id][0]]
        near = [a for a in near if inputs[a.event_id][0] <= self.recovered_at]
        self.worker_s = max((a.appended - inputs[a.event_id][0] for a in near), default=0.0)
        sent = [a for a in first.values() if self.at <= a.sent <= self.recovered_at]
        self.producer_s = max((inputs[a.event_id][0] - a.sent for a in sent), default=0.0)
        by_partition: dict[int, list[float]] = {}
        for a in sorted(flow.arrivals, key=lambda a: a.appended):
            if self.at - 1.0 <= a.appended <= self.recovered_at:
                by_partition.setdefault(a.partition, []).append(a.appended)
        self.gap_s = max(
            (
                max(b - a for a, b in itertools.pairwise(times))
                for times in by_partition.values()
                if len(times) > 1
            ),
            default=0.0,
        )
        nth: Counter[str] = Counter()
        for a in sorted(flow.arrivals, key=lambda a: a.appended):
            nth[a.event_id] += 1
            extra_copy = nth[a.event_id] > len(inputs[a.event_id])
            if extra_copy and self.at <= a.appended < self.until:
                self.duplicates += 1

    def line(self) -> str:
        return (
            f"{self.what} (node {self.node}): worker's longest delay {self.worker_s:.1f} s, "
            f"a prediction partition silent {self.gap_s:.1f} s, load generator's longest "
            f"delay {self.producer_s:.1f} s, {self.duplicates} duplicates"
        )


def worker_sound(setup: Setup, port: int) -> None:
    """The one worker is the process started at the beginning, healthy, and never crashed."""
    assert len(setup.workers) == 1
    assert setup.workers[0].poll() is None, "the worker exited:\n" + setup.worker_logs()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            assert r.status == 200
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"/healthz answered {exc.code}: {exc.read()!r}") from None
    log = "\n".join(p.read_text(errors="replace") for p in setup.tmp.glob("worker-*.log"))
    marks = [line for line in log.splitlines() if any(m in line for m in CRASH_MARKS)]
    assert not marks, "the worker crashed or restarted an agent:\n" + "\n".join(marks[:20])


def worker_events(setup: Setup) -> dict[str, int]:
    """How often the worker's log shows a lost group session, a revocation, a replaced producer."""
    log = "\n".join(p.read_text(errors="replace") for p in setup.tmp.glob("worker-*.log"))
    return {
        "sessions lost": log.count("SESSTMOUT"),
        # Partitions given up and taken back while serving (the last revocation is the
        # worker's own shutdown): a re-read from the committed offsets.
        "rejoined": max(0, log.count("revoked [") - 1),
        "producers replaced": log.count("the producer can no longer deliver"),
    }


def serve_the_rest(flow: Flow, load: OpenLoopProducer, setup: Setup, port: int) -> set[str]:
    """Stop the load, read until every id sent has a prediction, check the worker is sound;
    the ids sent."""
    load.stop()
    assert load.errors == 0
    expected = {f"e-{i}" for i in range(load.sent)}
    flow.read_until(lambda: expected <= flow.seen.keys(), 60, "every id served")
    flow.drain(quiet_s=1.5)
    worker_sound(setup, port)
    return expected


def duplicate_bound(rate: float, commit_outage_s: float) -> int:
    """What one fault can make the worker serve twice.

    The worker's producer is idempotent with acks=all: a produce retried after a leader change
    is deduplicated by the new leader, which holds the producer's sequence state replicated
    with the log (a duplicate from it is allowed all the same, up to the records in flight:
    see read_inputs). Otherwise a record is served twice only when the worker re-reads input
    it had served but whose offset was not committed: after its group session was lost (the
    coordinator was unreachable for longer than the session timeout: librdkafka revokes, the
    final commit fails with "assignment lost", and the rejoined member starts from the
    committed offsets).

    Served-but-uncommitted is at most the batches in flight, plus what was stored since the
    last successful commit: one auto-commit interval (and slack) in steady state, plus the time
    commits failed while the worker could still consume (``commit_outage_s``: a cluster's group
    coordinator being moved while other leaders serve; a broker's controlled shutdown).
    """
    return IN_FLIGHT + round(rate * (AUTO_COMMIT_INTERVAL_S + COMMIT_SLACK_S + commit_outage_s))


def _metadata(cluster: KafkaCluster, topics: list[str]) -> dict[str, Any] | None:
    """Partition metadata of the topics and the group offsets topic, from the live nodes."""
    live = [n.address() for n in cluster.nodes.values() if n.alive]
    admin = AdminClient({"bootstrap.servers": ",".join(live), "log_level": 0})
    try:
        meta = admin.list_topics(timeout=2).topics
    except Exception:
        return None
    wanted = [*topics, "__consumer_offsets"]
    if any(t not in meta or meta[t].error is not None for t in wanted):
        return None
    return {t: meta[t].partitions for t in wanted}


def in_sync(cluster: KafkaCluster, topics: list[str], replicas: int) -> bool:
    """Every partition has a leader and all its replicas in sync."""
    meta = _metadata(cluster, topics)
    return meta is not None and all(
        p.leader >= 0 and len(p.isrs) >= replicas for parts in meta.values() for p in parts.values()
    )


def led_by(cluster: KafkaCluster, topics: list[str], node: int) -> int | None:
    """How many partitions the node leads, as the live nodes see it (None: no answer)."""
    meta = _metadata(cluster, topics)
    if meta is None:
        return None
    return sum(p.leader == node for parts in meta.values() for p in parts.values())


def leader_of_both(cluster: KafkaCluster, first: str, second: str) -> int:
    """A node leading partitions of both topics (with 4 partitions on 3 nodes there is almost
    always one), else the leader of the first topic's partition 0."""
    meta = _metadata(cluster, [first, second])
    if meta is not None:
        both = {p.leader for p in meta[first].values()} & {p.leader for p in meta[second].values()}
        if both:
            return min(both)
    return cluster.partition_leader(first, 0)


def transaction_coordinator(cluster: KafkaCluster, setup: Setup) -> int:
    """The node leading the worker's transaction coordinator: the ``__transaction_state``
    partition its transactional.id hashes to (Kafka: ``Utils.abs(id.hashCode()) % partitions``,
    Java's String hash), the id read from the worker's log."""
    log = (setup.tmp / "worker-0.log").read_text(errors="replace")
    found = re.findall(r"transactional\.id (\S+) registered", log)
    assert found, "the worker logged no transactional.id"
    h = 0
    for ch in found[-1]:
        h = (31 * h + ord(ch)) & 0xFFFFFFFF
    return cluster.partition_leader("__transaction_state", (h & 0x7FFFFFFF) % TXN_PARTITIONS)


TXN_PARTITIONS = 10  # transaction.state.log.num.partitions of the local cluster


def check_producer_settings(setup: Setup) -> dict[str, Any]:
    """The worker's producer as it will be configured: acknowledged by every in-sync replica,
    idempotent (retries after a leader change are deduplicated), retried until
    ``message.timeout.ms`` (librdkafka's default 300 s unless the topology sets it)."""
    conf = producer_config(setup.topology.kafka)
    assert conf["acks"] == "all"
    assert conf["enable.idempotence"] is True
    return {k: conf.get(k, "default") for k in ("acks", "enable.idempotence", "message.timeout.ms")}


# --- a three-node cluster: leaders and the controller killed under load ------------------------


def _leaders_and_controller_killed(
    tmp_path: Path,
    *,
    plan: str,
    rounds: int,
    rate: float,
    broker_session_ms: int,
    kafka: dict[str, Any],
    keeps_session: bool,
    exactly_once: bool = False,
) -> None:
    started = time.monotonic()
    config = {
        "min.insync.replicas": "2",
        # How long the controller waits for a silent broker before fencing it and moving its
        # leaderships (Kafka's default 9 s, heartbeats every 2 s).
        "broker.session.timeout.ms": str(broker_session_ms),
        "broker.heartbeat.interval.ms": str(max(500, broker_session_ms // 4)),
        **APPEND_TIME,
    }
    cluster = KafkaCluster(3, config=config, workdir=tmp_path / "kafka").start()
    try:
        start_s = cluster.started_in_s or 0.0
        setup = Setup(
            cluster.bootstrap_servers,
            tmp_path,
            topics={"replication_factor": 3},
            batching=BATCHING,
            kafka=kafka,
            processing={"guarantee": "exactly_once" if exactly_once else "at_least_once"},
        )
        producer = check_producer_settings(setup)
        topics = [setup.topics.input, setup.topics.predictions]
        port = free_port()
        setup.start_worker(web_port=port)
        load = steady_load(cluster, setup, rate)
        flow = Flow(setup)
        faults: list[Fault] = []
        try:
            first_s = flow.read_until(lambda: len(flow.seen) > 0, 90, "first prediction")
            input_topic, predictions = setup.topics.input, setup.topics.predictions
            targets: list[tuple[str, Callable[[], int]]] = (
                [("input+predictions leader", lambda: leader_of_both(cluster, *topics))]
                if plan == "short"
                else [("transaction coordinator", lambda: transaction_coordinator(cluster, setup))]
                if plan == "coordinator"
                else [
                    ("input leader", lambda: cluster.partition_leader(input_topic, 0)),
                    ("predictions leader", lambda: cluster.partition_leader(predictions, 0)),
                    ("controller", cluster.quorum_leader),
                ]
            ) * rounds
            for what, target in targets:
                flow.read_until(flow.caught_up(load), 60, "catch-up before a fault")
                flow.read(SETTLE_S)
                node = target()
                leading = led_by(cluster, topics, node)
                if faults:
                    faults[-1].until = time.time()
                cluster.kill(node)
                fault = Fault(what, node, at=time.time())
                faults.append(fault)
                fault.extra["led"] = float(leading or 0)
                # The controller fences the silent node and elects new leaders among the two
                # left (for the controller itself, a new controller is elected first)...
                fault.extra["elected_s"] = flow.read_until(
                    lambda n=node: led_by(cluster, topics, n) == 0, 60, f"leaders off node {node}"
                )
                # ...and the worker, through them, serves everything sent since the kill.
                fault.extra["caught_up_s"] = flow.read_until(
                    flow.caught_up(load), 60, f"serving after the {what} was killed"
                )
                fault.recovered_at = time.time()
                t0 = time.monotonic()
                cluster.start_node(node)
                # Only then the next fault: with a replica still catching up, one more death
                # would leave partitions below min.insync.replicas (a stall, not this test).
                flow.read_until(lambda: in_sync(cluster, topics, 3), 60, "replicas back in sync")
                fault.restart_s = time.monotonic() - t0
            flow.read_until(flow.caught_up(load), 60, "catch-up after the last restart")
            expected = serve_the_rest(flow, load, setup, port)
        finally:
            load.stop()
            flow.close()
            setup.stop()
        flow.dump(tmp_path / "arrivals.csv")
        inputs = read_inputs(setup, load.sent)
        twice = sum(len(copies) - 1 for copies in inputs.values())  # by the load generator
        missing = expected - flow.seen.keys()
        assert not missing, f"{len(missing)} events lost, e.g. {sorted(missing)[:5]}"
        assert flow.seen.keys() == expected == inputs.keys(), "predictions for ids never sent"
        for f in faults:
            f.measure(flow, inputs)
        duplicates = sum(max(0, n - len(inputs[i])) for i, n in flow.seen.items())
        # Commits fail until the coordinator's partition has a new leader, and the worker has
        # found it (librdkafka asks for the coordinator again within a second).
        bounds = [duplicate_bound(rate, f.extra["elected_s"] + 1.0) for f in faults]
        print(
            f"\n3 nodes started in {start_s:.1f} s, the worker's first prediction {first_s:.1f} s "
            f"later; worker producer {producer}; "
            f"{load.sent} events at {rate:.0f}/s, {twice} written twice by the load "
            f"generator; {duplicates} duplicates in all ({flow.read_twice} records handed to "
            f"the reader twice, not counted); "
            f"worker log: {worker_events(setup)}; {time.monotonic() - started:.1f} s"
        )
        for f, bound in zip(faults, bounds, strict=True):
            print(
                f"  {f.line()} (bound {bound}); it led {f.extra['led']:.0f} partitions, all "
                f"moved {f.extra['elected_s']:.1f} s after the kill, the worker caught up "
                f"{f.extra['caught_up_s']:.1f} s later; restarted and in sync in "
                f"{f.restart_s:.1f} s"
            )
        if exactly_once:
            # Read committed (the reader's isolation): a transaction open when its leader or
            # coordinator died either committed whole or was aborted and served again.
            assert duplicates == 0, f"{duplicates} events served twice under exactly_once"
        assert duplicates == sum(f.duplicates for f in faults), "a duplicate before any fault"
        seen = worker_events(setup)
        if keeps_session:
            assert seen["rejoined"] == 0, "the worker's group session did not outlast a fault"
        if not seen["rejoined"] and not seen["producers replaced"]:
            # Nothing re-read: a duplicate could only come from the worker's producer, whose
            # retries the broker deduplicates (0 in every run so far); allowed, as at-least-once
            # does, up to what it had in flight (see read_inputs).
            for f in faults:
                assert f.duplicates <= IN_FLIGHT, f"without a re-read: {f.line()}"
        for f, bound in zip(faults, bounds, strict=True):
            assert f.duplicates <= bound, f.line()
    finally:
        cluster.stop()


# The product's default group session (the suite's 6 s suits tansu's slow joins).
SESSION_10S = {"session_timeout_ms": 10_000}


@pytest.mark.parametrize(
    ("plan", "rounds", "rate", "broker_session_ms", "kafka", "keeps_session"),
    [
        # One kill: a node leading input and prediction partitions (the controller's death is
        # in the soak plans). A silent broker is fenced after 3 s, so the test stays short.
        # CI's 3-node fault (the exactly_once variant below is in the soak: an open defect).
        pytest.param(
            "short",
            1,
            300.0,
            3000,
            SESSION_10S,
            False,
            marks=[pytest.mark.timeout(240)],
            id="short",
        ),
        # Three kills (input leader, predictions leader, controller), twice, more load, and
        # Kafka's default broker session (9 s): with the worker's default 10 s session, then with
        # 30 s, then with the consumer protocol (KIP-848: the broker's 45 s session).
        pytest.param(
            "full",
            2,
            500.0,
            9000,
            SESSION_10S,
            False,
            marks=[pytest.mark.soak, pytest.mark.timeout(900)],
            id="soak-session-10s",
        ),
        pytest.param(
            "full",
            2,
            500.0,
            9000,
            {"session_timeout_ms": 30_000},
            True,
            marks=[pytest.mark.soak, pytest.mark.timeout(900)],
            id="soak-session-30s",
        ),
        pytest.param(
            "full",
            2,
            500.0,
            9000,
            {"group_protocol": "consumer", "session_timeout_ms": None},
            True,
            marks=[pytest.mark.soak, pytest.mark.timeout(900)],
            id="soak-consumer-protocol",
        ),
    ],
)
def test_leaders_and_the_controller_killed_under_load_lose_nothing(
    tmp_path: Path,
    plan: str,
    rounds: int,
    rate: float,
    broker_session_ms: int,
    kafka: dict[str, Any],
    keeps_session: bool,
) -> None:
    require_local_kafka()
    _leaders_and_controller_killed(
        tmp_path,
        plan=plan,
        rounds=rounds,
        rate=rate,
        broker_session_ms=broker_session_ms,
        kafka=kafka,
        keeps_session=keeps_session,
    )


@pytest.mark.timeout(240)
# In the soak, not CI: an open defect. When the killed node also hosts the worker's
# transaction coordinator (about one run in three: the coordinator follows the transactional
# id's hash), CI saw the worker exit (send_offsets: _TRANSPORT, now an abort) and, once that
# was fixed, stall with 4 batches in flight for over 60 s with librdkafka still connecting to
# the dead coordinator. /healthz fails it after limits.max_unacked_s and a restart recovers,
# but one process throughout, as asserted here, is not proven yet (the coordinator variant,
# which kills that node on purpose, passed 3 of 3 runs here on 2026-12-01).
@pytest.mark.soak
@pytest.mark.parametrize(
    "plan",
    [
        pytest.param("short", id="input-and-predictions-leader"),
        pytest.param("coordinator", id="transaction-coordinator"),
    ],
)
def test_transactions_open_when_a_leader_is_killed_serve_every_event_exactly_once(
    tmp_path: Path, plan: str
) -> None:
    """exactly_once on three nodes: the node leading an input and a prediction partition
    (``short``), or the one leading the worker's transaction coordinator (its
    ``__transaction_state`` partition, ``coordinator``), is SIGKILLed while transactions are
    open (the worker runs one per batch without pause at this rate), then restarted. One worker
    process throughout; read committed, every id once."""
    require_local_kafka()
    _leaders_and_controller_killed(
        tmp_path,
        plan=plan,
        rounds=1,
        rate=300.0,
        broker_session_ms=3000,
        kafka=SESSION_10S,
        keeps_session=False,
        exactly_once=True,
    )


# --- one broker stopped and restarted on its data ------------------------------------------


DOWN_S = 3.0  # how long the broker stays down


@pytest.mark.timeout(180)
# A soak test: CI's 3-node test kills and restarts a node already, and the suite must stay
# well under 15 minutes on 2 cores.
@pytest.mark.soak
@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_a_broker_restarted_on_its_data_loses_nothing(tmp_path: Path, how: str) -> None:
    require_local_kafka()
    started = time.monotonic()
    rate = 300.0
    cluster = KafkaCluster(1, config=APPEND_TIME, workdir=tmp_path / "kafka").start()
    try:
        setup = Setup(
            cluster.bootstrap_servers,
            tmp_path,
            batching=BATCHING,
            kafka=SESSION_10S,
        )
        port = free_port()
        setup.start_worker(web_port=port)
        load = steady_load(cluster, setup, rate)
        flow = Flow(setup)
        try:
            flow.read_until(lambda: len(flow.seen) > 0, 90, "first prediction")
            flow.read_until(flow.caught_up(load), 60, "catch-up")
            flow.read(SETTLE_S)
            fault = Fault(how, 1, at=time.time())
            if how == "sigterm":
                fault.extra["stop_s"] = cluster.terminate(1)
            else:
                cluster.kill(1)
                fault.extra["stop_s"] = time.time() - fault.at
            time.sleep(DOWN_S)
            t0 = time.monotonic()
            cluster.start_node(1)
            fault.restart_s = time.monotonic() - t0
            fault.extra["caught_up_s"] = flow.read_until(flow.caught_up(load), 90, "catch-up")
            fault.recovered_at = time.time()
            expected = serve_the_rest(flow, load, setup, port)
        finally:
            load.stop()
            flow.close()
            setup.stop()
        flow.dump(tmp_path / "arrivals.csv")
        inputs = read_inputs(setup, load.sent)
        missing = expected - flow.seen.keys()
        assert not missing, f"{len(missing)} events lost, e.g. {sorted(missing)[:5]}"
        assert flow.seen.keys() == expected == inputs.keys(), "predictions for ids never sent"
        fault.measure(flow, inputs)
        duplicates = sum(max(0, n - len(inputs[i])) for i, n in flow.seen.items())
        bound = duplicate_bound(rate, fault.extra["stop_s"])
        print(
            f"\n1 broker, {how}: stopped in {fault.extra['stop_s']:.1f} s, down {DOWN_S:.0f} s, "
            f"restarted in {fault.restart_s:.1f} s; {fault.line()}; caught up "
            f"{fault.extra['caught_up_s']:.1f} s after the restart; {load.sent} events, "
            f"{duplicates} duplicates (bound {bound}); worker log: {worker_events(setup)}; "
            f"{time.monotonic() - started:.1f} s"
        )
        assert duplicates == fault.duplicates
        seen = worker_events(setup)
        if not seen["rejoined"] and not seen["producers replaced"]:
            assert duplicates <= IN_FLIGHT, "duplicates without a re-read"
        assert duplicates <= bound
    finally:
        cluster.stop()


# --- the launcher ------------------------------------------------------------------------------


def _gone(pid: int) -> bool:
    """The process no longer runs (a zombie waiting for its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


LAUNCH = """
import sys, time
from stream_infer.local.apache_kafka import KafkaCluster
cluster = KafkaCluster(1).start()
print(cluster.nodes[1].pid, cluster.workdir, flush=True)
time.sleep(600)
"""


@pytest.mark.timeout(120)
def test_a_broker_dies_with_the_process_that_started_it() -> None:
    require_local_kafka()
    parent = subprocess.Popen(
        [sys.executable, "-c", LAUNCH], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline().decode().split()
        assert len(line) == 2, f"the launcher printed {line!r}"
        java, workdir = int(line[0]), Path(line[1])
        assert not _gone(java)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        killed = time.monotonic()
        while not _gone(java):
            assert time.monotonic() - killed < 5, f"java {java} outlived its parent by 5 s"
            time.sleep(0.05)
        print(f"\nbroker gone {time.monotonic() - killed:.2f} s after its parent's SIGKILL")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
    # Nobody was left to remove the killed launcher's temporary folder: this test does.
    assert workdir.name.startswith("stream-infer-kafka-")
    shutil.rmtree(workdir)


@pytest.mark.timeout(120)
def test_stop_leaves_no_process_and_no_folder() -> None:
    require_local_kafka()
    cluster = KafkaCluster(1).start()
    pids = [n.pid for n in cluster.nodes.values() if n.pid is not None]
    workdir = cluster.workdir
    assert pids and workdir.is_dir()
    t0 = time.monotonic()
    cluster.stop()
    stop_s = time.monotonic() - t0
    assert all(_gone(pid) for pid in pids), f"still running after stop(): {pids}"
    assert not workdir.exists(), f"{workdir} left behind"
    print(f"\nstarted in {cluster.started_in_s:.1f} s, stopped in {stop_s:.1f} s")
