"""exactly_once on Apache Kafka: one transaction per micro-batch, checked from the outside.

Every check reads the outputs the way the README tells users to, with
``isolation.level=read_committed``, and counts per input record: each id the load generator
wrote once must have exactly one prediction (or dead letter), none lost, none twice. Where a
test provokes aborted work, a ``read_uncommitted`` reader shows that it did happen (the
check is not vacuous): the aborted records are in the log, invisible to committed readers.

The 3-node leader-kill variant is in test_kafka_cluster.py (it shares that file's cluster
harness).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ResourceType,
)

from stream_infer.io.clients import consume_ready
from stream_infer.local.tansu import EmbeddedBroker, free_port
from tests.brokers import broker_choice
from tests.integration.conftest import Setup, good_events, metric, scrape, wait_ready
from tests.integration.test_faults import Reader, endless_load, input_ids, run_faulty_worker

EXACTLY_ONCE = {"guarantee": "exactly_once"}
BATCHING = {"max_batch_size": 64, "max_wait_ms": 5}
SEED = 20261130


@pytest.fixture
def kafka_setup(make_setup: Any) -> Any:
    """``make_setup``, on Apache Kafka only."""
    if not broker_choice().is_apache_kafka:
        pytest.skip(
            "exactly_once needs a broker whose transactions work: the embedded tansu broker "
            "returns aborted records to read_committed readers (its refusal is tested below)"
        )
    return make_setup


def reader(setup: Setup, topic: str, isolation: str) -> Consumer:
    """A group-less consumer of every partition of ``topic`` from the beginning."""
    consumer = Consumer(
        {
            "bootstrap.servers": setup.bootstrap,
            "group.id": f"it-reader-{isolation}",
            "enable.auto.commit": False,
            "isolation.level": isolation,
        }
    )
    consumer.assign(
        [TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(setup.topics.partitions)]
    )
    return consumer


class IsolatedReader(Reader):
    """test_faults' Reader (ids counted as they arrive), with a chosen isolation level."""

    def __init__(self, setup: Setup, topic: str, isolation: str) -> None:
        self.setup = setup
        self.consumer = reader(setup, topic, isolation)
        self.seen: Counter[str] = Counter()
        self.first_seen: dict[str, float] = {}


def read_all(setup: Setup, topic: str, isolation: str, quiet_s: float = 2.0) -> list[bytes]:
    """Every record value of ``topic`` until nothing arrives for ``quiet_s``."""
    consumer = reader(setup, topic, isolation)
    out: list[bytes] = []
    try:
        quiet_until = time.monotonic() + quiet_s
        while time.monotonic() < quiet_until:
            got = [m for m in consume_ready(consumer, 1000, 0.2) if m.error() is None]
            if got:
                quiet_until = time.monotonic() + quiet_s
            out += [m.value() or b"" for m in got]
    finally:
        consumer.close()
    return out


def exactly_once_counts(seen: Counter[str], copies: Counter[str]) -> tuple[list[str], list[str]]:
    """(ids lost, ids seen more often than the load generator wrote them)."""
    lost = sorted(i for i in copies if seen[i] == 0)
    twice = sorted(i for i, n in seen.items() if n > copies[i])
    return lost, twice


# --- five SIGKILLs under steady load ---------------------------------------------------------


@pytest.mark.timeout(300)
def test_sigkill_five_times_under_load_every_id_is_served_exactly_once(kafka_setup: Any) -> None:
    """The worker is SIGKILLed at random moments (its transaction thread is busy nearly all
    the time at this rate: most kills land inside a transaction) and restarted with the same
    worker.id, as a pod's container is: the restart aborts the dead one's open transaction."""
    started = time.monotonic()
    kills, rate = 5, 150.0
    setup = kafka_setup(batching=BATCHING, processing=EXACTLY_ONCE, worker={"id": "eos-a"})
    rng = random.Random(SEED)
    load = endless_load(setup, rate)
    committed_view = IsolatedReader(setup, setup.topics.predictions, "read_committed")
    downtimes = []
    try:
        worker = setup.start_worker()
        for kill in range(kills + 1):
            committed_view.read_more(timeout_s=90)
            committed_view.read_until(
                lambda: len(committed_view.seen) >= load.sent - rate / 2, 60, "catch-up"
            )
            if kill == kills:
                break
            committed_view.read(0.5 + rng.uniform(0.0, 1.5))
            assert worker.poll() is None, "the worker died before it was killed"
            os.kill(worker.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            assert worker.wait(10) == -signal.SIGKILL
            worker = setup.start_worker()
            committed_view.read_more(timeout_s=90)
            downtimes.append(round(time.monotonic() - killed_at, 1))
        load.stop()
        assert load.errors == 0
        expected = {f"e-{i}" for i in range(load.sent)}
        committed_view.read_until(lambda: expected <= committed_view.seen.keys(), 60, "every id")
        committed_view.drain(quiet_s=2.0)
    finally:
        load.stop()
        committed_view.close()
    assert worker.poll() is None, "the last worker must be alive"
    copies = Counter(input_ids(setup, load.sent).values())  # the generator may write one twice
    lost, twice = exactly_once_counts(committed_view.seen, copies)
    uncommitted = Counter(
        orjson.loads(v)["id"] for v in read_all(setup, setup.topics.predictions, "read_uncommitted")
    )
    aborted_copies = sum(uncommitted.values()) - sum(committed_view.seen.values())
    print(
        f"\nexactly_once, {kills} SIGKILLs at {rate:.0f} events/s: {load.sent} events, "
        f"{len(lost)} lost, {len(twice)} served twice (read_committed); {aborted_copies} "
        f"predictions of aborted transactions in the log (read_uncommitted); back to serving "
        f"after {downtimes} s; {time.monotonic() - started:.1f} s"
    )
    assert not lost, f"{len(lost)} events lost, e.g. {lost[:5]}"
    assert not twice, f"{len(twice)} events served twice, e.g. {twice[:5]}"
    assert set(committed_view.seen) == expected, "predictions for ids never sent"


# --- a zombie ---------------------------------------------------------------------------------


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("stage", "freeze_s", "transaction_timeout_ms", "outcome"),
    [
        # 20 s: past the transaction timeout (6 s) plus the coordinator's scan for timed-out
        # transactions (transaction.abort.timed.out.transaction.cleanup.interval.ms, 10 s by
        # default): resumed before that scan, A's commit still succeeds (nothing is lost or
        # served twice: B's offset fetch waited for it) and A carries on, not fenced.
        ("commit", 20.0, 6000, "fenced"),
        # The soak runs it: the rewind after an abort runs in CI in the refusal test below.
        pytest.param("send_offsets", 10.0, 30_000, "aborted", marks=pytest.mark.soak),
    ],
)
def test_a_frozen_worker_resumed_after_its_partitions_moved_makes_nothing_visible(
    kafka_setup: Any, stage: str, freeze_s: float, transaction_timeout_ms: int, outcome: str
) -> None:
    """Worker A is frozen (SIGSTOP) past its 6 s group session inside a transaction, in its
    0.5 s wait before ``stage`` (tests/integration/slow_transactions_worker marks it); B
    takes its partitions over and serves them from the last committed offsets. A is then
    resumed: nothing it had in flight may become visible, and every id is served exactly once.

    - fenced: frozen past the transaction timeout and the coordinator's next scan for timed-out
      transactions too, the coordinator aborted A's transaction
      (B's offset fetch waited for that) and bumped its producer epoch: A's next transactional
      call is fenced, A stops (exit 1, the reason in its log) and would be restarted.
    - aborted: frozen for less than the transaction timeout, before its offsets were sent: they
      carry A's old generation, which the group refuses (KIP-447); A aborts, reads again from
      the committed offsets and carries on as a member."""
    started = time.monotonic()
    rate = 100.0
    setup = kafka_setup(
        batching=BATCHING,
        processing=EXACTLY_ONCE,
        kafka={"session_timeout_ms": 6000, "transaction_timeout_ms": transaction_timeout_ms},
    )
    port_a, port_b = free_port(), free_port()
    mark = setup.tmp / "in-the-wait"
    load = endless_load(setup, rate)
    committed_view = IsolatedReader(setup, setup.topics.predictions, "read_committed")
    try:
        a = setup.start_worker(
            web_port=port_a,
            module=("tests.integration.slow_transactions_worker", stage, "0.5", str(mark)),
        )
        wait_ready(port_a, 90)
        b = setup.start_worker(web_port=port_b)
        wait_ready(port_b, 90)
        deadline = time.monotonic() + 60
        while not (
            scrape(port_a, "stream_infer_assigned_partitions") > 0
            and scrape(port_b, "stream_infer_assigned_partitions") > 0
        ):
            assert time.monotonic() < deadline, "the two workers never shared the partitions"
            committed_view.read(0.2)
        committed_view.read(2.0)
        a_transactions = scrape(port_a, "stream_infer_transactions_total", outcome="committed")
        assert a_transactions > 0, "A committed nothing before the freeze"
        # Freeze A inside its wait before `stage`: the mark exists only there, so A stopped
        # with the mark present has not called `stage` yet (else resume it and try again).
        deadline = time.monotonic() + 30
        while True:
            assert time.monotonic() < deadline, f"A never stopped inside its wait before {stage}"
            if not mark.exists():
                time.sleep(0.005)
                continue
            os.kill(a.pid, signal.SIGSTOP)
            if mark.exists():
                break
            os.kill(a.pid, signal.SIGCONT)
        frozen_at = time.monotonic()
        committed_view.read(freeze_s)
        # B took everything over while A was frozen.
        assert scrape(port_b, "stream_infer_assigned_partitions") == setup.topics.partitions
        # A may stop on its own from here (fenced): the readers must not take it for a crash.
        setup.workers.remove(a)
        os.kill(a.pid, signal.SIGCONT)
        resumed_s = time.monotonic() - frozen_at
        committed_view.read(8.0)  # A finds out, and B goes on
        load.stop()
        assert load.errors == 0
        expected = {f"e-{i}" for i in range(load.sent)}
        committed_view.read_until(lambda: expected <= committed_view.seen.keys(), 60, "every id")
        committed_view.drain(quiet_s=2.0)
        a_state = a.poll()
        a_aborted = (
            scrape(port_a, "stream_infer_transactions_total", outcome="aborted")
            if (a_state is None)
            else 0.0
        )
        a_log = (setup.tmp / "worker-0.log").read_text(errors="replace")
    finally:
        load.stop()
        committed_view.close()
        if a.poll() is None:
            os.kill(a.pid, signal.SIGCONT)
            a.terminate()
            a.wait(30)
    copies = Counter(input_ids(setup, load.sent).values())
    lost, twice = exactly_once_counts(committed_view.seen, copies)
    marks = ("abort", "fenced", "epoch", "generation")
    a_lines = [line for line in a_log.splitlines() if any(m in line.lower() for m in marks)][-2:]
    print(
        f"\nzombie ({outcome}): A frozen {resumed_s:.1f} s; {load.sent} events at {rate:.0f}/s, "
        f"{len(lost)} lost, {len(twice)} served twice; A afterwards: "
        f"{'running' if a_state is None else f'exited {a_state}'}; A's log: {a_lines}; "
        f"{time.monotonic() - started:.1f} s"
    )
    assert not lost, f"{len(lost)} events lost, e.g. {lost[:5]}"
    assert not twice, f"{len(twice)} events served twice, e.g. {twice[:5]}"
    assert b.poll() is None, "B must still serve:\n" + setup.worker_logs()
    if outcome == "fenced":
        assert a_state == 1, f"A must stop once fenced (exit {a_state}):\n{a_log[-3000:]}"
        assert "fenced by a newer instance" in a_log, a_log[-3000:]
    else:
        assert a_state is None, f"A must carry on after an abort (exit {a_state}):\n{a_log[-3000:]}"
        assert a_aborted >= 1, "A aborted nothing: it was not frozen inside a transaction"


# --- failing batches ------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_a_delivery_refused_inside_a_transaction_aborts_it_and_the_batch_is_served_again(
    kafka_setup: Any,
) -> None:
    """The prediction topic's max.message.bytes is lowered under a running worker (its start-up
    size check knows the old limit): the broker refuses the predictions inside the batch's
    transaction, which is aborted with the dead letters of the batch's invalid events already
    written. The records fitted the limit the worker knows, so the limit was lowered: the batch
    fails and the worker exits (1); restarted, it reads the new limit and serves the batch again
    with the predictions, too large now, as `undeliverable` dead letters. Read committed: every
    input id exactly once, as a prediction or a dead letter. Read uncommitted: the aborted
    attempt's dead letters are there too (nothing partial was visible to committed readers)."""
    started = time.monotonic()
    setup = kafka_setup(batching=BATCHING, processing=EXACTLY_ONCE, topics={"partitions": 1})
    port = free_port()
    setup.start_worker(web_port=port)
    wait_ready(port, 90)
    setup.produce(good_events(50, prefix="before"))
    before = setup.collect(setup.topics.predictions, until=50, timeout_s=60)
    assert len(before) == 50
    admin = AdminClient({"bootstrap.servers": setup.bootstrap})
    resource = ConfigResource(
        ResourceType.TOPIC,
        setup.topics.predictions,
        incremental_configs=[
            ConfigEntry("max.message.bytes", "100", incremental_operation=AlterConfigOpType.SET)
        ],
    )
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(30)
    # Valid and invalid events alternate: each batch holds dead letters (accepted) and
    # predictions (refused).
    n = 40
    items: list[tuple[bytes | None, bytes]] = []
    for i, (key, value) in enumerate(good_events(n, prefix="after")):
        items.append((key, value))
        items.append((key, orjson.dumps({"id": f"bad-{i}", "features": "not a mapping"})))
    setup.produce(items)
    first = setup.workers[0]
    try:
        code = first.wait(60)
    except subprocess.TimeoutExpired:
        raise AssertionError("the worker did not stop:\n" + setup.worker_logs()) from None
    setup.workers.remove(first)
    first_log = (setup.tmp / "worker-0.log").read_text(errors="replace")
    assert code == 1, first_log[-3000:]
    assert "max.message.bytes is lower than when this worker started" in first_log
    setup.start_worker()
    wanted = {f"after-{i}" for i in range(n)} | {f"bad-{i}" for i in range(n)}
    letters: Counter[str] = Counter()
    deadline = time.monotonic() + 90
    while not wanted <= letters.keys():
        assert time.monotonic() < deadline, (
            f"not every id dead-lettered: {sorted(wanted - letters.keys())[:5]}\n"
            + setup.worker_logs()
        )
        letters = Counter(
            _letter_id(v) for v in read_all(setup, setup.topics.dead_letter, "read_committed", 1.0)
        )
    committed_predictions = [
        orjson.loads(v)["id"] for v in read_all(setup, setup.topics.predictions, "read_committed")
    ]
    uncommitted_letters = Counter(
        _letter_id(v) for v in read_all(setup, setup.topics.dead_letter, "read_uncommitted")
    )
    aborted = first_log.count("max.message.bytes is lower than when this worker started")
    print(
        f"\na refusal inside a transaction: the first worker's batch aborted and failed "
        f"({aborted} log lines), exit {code}; "
        f"{sum(letters.values())} dead letters committed, "
        f"{sum(uncommitted_letters.values())} in the log; {time.monotonic() - started:.1f} s"
    )
    assert aborted >= 1
    assert sorted(committed_predictions) == sorted(p["id"] for p in before)
    twice = sorted(i for i, c in letters.items() if c > 1)
    assert not twice, f"dead-lettered twice: {twice[:5]}"
    assert sum(uncommitted_letters.values()) > sum(letters.values()), (
        "the aborted attempt's dead letters are not in the log: the test provoked no abort"
    )
    assert setup.workers[-1].poll() is None, "the restarted worker must serve on"


def _letter_id(value: bytes) -> str:
    """The event id inside a dead letter (an invalid event's raw payload, or the refused
    prediction it keeps)."""
    doc = orjson.loads(value)
    raw = doc.get("raw") or doc.get("value") or ""
    try:
        inner = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return str(raw)
    return str(inner.get("id"))


@pytest.mark.timeout(180)
def test_a_batch_that_fails_before_its_transaction_is_served_again_after_the_restart(
    kafka_setup: Any,
) -> None:
    """The serving path raises for the batch holding e-500 (tests/integration/faulty_worker):
    its transaction is never begun, the worker exits, and the restarted worker serves it from
    the committed offsets. Read committed: every id exactly once."""
    n, fail_at = 1000, 500
    setup = kafka_setup(
        topics={"partitions": 1},
        batching={"max_batch_size": 50, "max_wait_ms": 5},
        processing=EXACTLY_ONCE,
        worker={"id": "eos-f"},
    )
    code = run_faulty_worker(setup, n, fail_at)
    assert code != 0
    assert f"injected: publish fails for the batch holding e-{fail_at}" in setup.worker_logs()
    served = Counter(
        orjson.loads(v)["id"]
        for v in read_all(setup, setup.topics.predictions, "read_committed", 1.0)
    )
    assert f"e-{fail_at}" not in served
    setup.start_worker()
    expected = {f"e-{i}" for i in range(n)}
    view = IsolatedReader(setup, setup.topics.predictions, "read_committed")
    try:
        view.read_until(lambda: expected <= view.seen.keys(), 90, "every id")
        view.drain(quiet_s=2.0)
    finally:
        view.close()
    twice = sorted(i for i, c in view.seen.items() if c > 1)
    print(f"\nfailed batch at e-{fail_at}: exit {code}, {len(served)} served before it")
    assert not twice, f"served twice: {twice[:5]}"
    assert set(view.seen) == expected


# --- a broker without working transactions ----------------------------------------------------


@pytest.mark.timeout(120)
def test_exactly_once_is_refused_at_start_on_the_embedded_broker(tmp_path: Path) -> None:
    """tansu accepts every transactional call, then hands an aborted record to a read_committed
    reader: an exactly_once worker must refuse to start there, with one message (exit 2)."""
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as broker:
        setup = Setup(broker.bootstrap_servers, tmp_path, processing=EXACTLY_ONCE)
        doc = yaml.safe_load(setup.path.read_text())
        assert doc["processing"] == EXACTLY_ONCE
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_INFER_")}
        env["STREAM_INFER_WORKER__WEB_PORT"] = str(free_port())
        run = subprocess.run(
            [sys.executable, "-m", "stream_infer", "worker", str(setup.path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
    out = run.stdout + run.stderr
    assert run.returncode == 2, out
    assert "exactly_once needs a broker whose transactions work" in out, out
    assert "read_committed reader was given an aborted record" in out, out
    assert "Traceback" not in out, out


# --- downstream readers ---------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_tail_prints_committed_records_only(kafka_setup: Any) -> None:
    """`stream-infer tail` reads with read_committed: a record written in an aborted
    transaction is in the log (a read_uncommitted reader sees it) but never printed."""
    from confluent_kafka import Producer

    setup = kafka_setup(topics={"partitions": 1})
    producer = Producer(
        {"bootstrap.servers": setup.bootstrap, "transactional.id": f"it-tail-{setup.doc['name']}"}
    )
    producer.init_transactions(30)
    for outcome in ("aborted", "committed"):
        producer.begin_transaction()
        producer.produce(setup.topics.predictions, orjson.dumps({"id": outcome}), b"k")
        producer.flush(30)
        if outcome == "aborted":
            producer.abort_transaction(30)
        else:
            producer.commit_transaction(30)
    assert [
        orjson.loads(v)["id"]
        for v in read_all(setup, setup.topics.predictions, "read_uncommitted", 1.0)
    ] == [
        "aborted",
        "committed",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_INFER_")}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "stream_infer",
            "tail",
            str(setup.path),
            "--from-beginning",
            "--count",
            "1",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert [orjson.loads(line)["id"] for line in run.stdout.splitlines()] == ["committed"]


# --- the consumer group protocol (KIP-848) ----------------------------------------------------


@pytest.mark.timeout(180)
def test_exactly_once_under_the_consumer_group_protocol_across_a_scale_out(
    kafka_setup: Any,
) -> None:
    """With group.protocol=consumer the group's fencing field is the member epoch, which moves
    with every assignment change: the offsets must still commit (every transaction aborting
    would serve nothing), and a second worker joining mid-stream must not make any id twice."""
    started = time.monotonic()
    setup = kafka_setup(
        batching=BATCHING,
        processing=EXACTLY_ONCE,
        kafka={"group_protocol": "consumer", "session_timeout_ms": None},
    )
    port = free_port()
    setup.start_worker(web_port=port)
    wait_ready(port, 90)
    view = IsolatedReader(setup, setup.topics.predictions, "read_committed")
    try:
        setup.produce(good_events(1000, prefix="a"))
        view.read_until(lambda: len(view.seen) >= 1000, 60, "the first 1000")
        setup.start_worker()
        setup.produce(good_events(1000, prefix="b"))
        view.read_until(lambda: len(view.seen) >= 2000, 90, "all 2000")
        view.drain(quiet_s=2.0)
    finally:
        view.close()
    committed = metric(port, "stream_infer_transactions_total", outcome="committed")
    aborted = metric(port, "stream_infer_transactions_total", outcome="aborted")
    twice = sorted(i for i, n in view.seen.items() if n > 1)
    print(
        f"\nexactly_once, consumer protocol, 1 then 2 workers: {len(view.seen)} ids, "
        f"{len(twice)} twice; the first worker committed {committed:.0f} transactions, aborted "
        f"{aborted:.0f}; {time.monotonic() - started:.1f} s"
    )
    expected = {f"a-{i}" for i in range(1000)} | {f"b-{i}" for i in range(1000)}
    assert set(view.seen) == expected
    assert not twice, f"served twice: {twice[:5]}"
