"""What only a real Kafka cluster makes testable about the topics: partitions added under load,
input and labels topics partitioned differently, the lag as Kafka's admin API counts it, and
the control topic `stream-infer topics` creates or refuses.

Apache Kafka only: tansu has no CreatePartitions and reports only a topic's explicit settings.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from confluent_kafka import ConsumerGroupTopicPartitions, Producer, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ConfigResource,
    NewPartitions,
    NewTopic,
    OffsetSpec,
    ResourceType,
)

from stream_infer.local.loadgen import OpenLoopProducer
from stream_infer.local.tansu import free_port
from stream_infer.settings import ENV_PREFIX
from tests.brokers import broker_choice
from tests.integration.conftest import Setup, assert_healthy, good_events, health, scrape
from tests.integration.faulty_models import HANGS
from tests.integration.test_model_faults import _events, _faulty_model

ROOT = Path(__file__).resolve().parents[2]
ONLINE = {"learners": [{"model": "risk", "version": "online"}]}
PROTOCOLS: dict[str, dict[str, Any]] = {
    "classic": {},
    "consumer": {"group_protocol": "consumer", "session_timeout_ms": None},
}


@pytest.fixture(autouse=True)
def _apache_kafka_only() -> None:
    if not broker_choice().is_apache_kafka:
        pytest.skip("needs Apache Kafka: tansu has no CreatePartitions and no topic defaults")


def _admin(setup: Setup) -> AdminClient:
    return AdminClient({"bootstrap.servers": setup.bootstrap} | setup.client_conf)


def _add_partitions(setup: Setup, counts: dict[str, int]) -> None:
    admin = _admin(setup)  # held until the futures are done: a dropped client cancels them
    futures = admin.create_partitions([NewPartitions(t, n) for t, n in counts.items()])
    for fut in futures.values():
        fut.result(30)


def _start(setup: Setup, n: int, partitions: int) -> list[int]:
    """Start n workers; wait until together they own every input partition, each at least one."""
    ports = [free_port() for _ in range(n)]
    for port in ports:
        setup.start_worker(web_port=port)
    _owned(setup, ports, partitions)
    return ports


def _owned(setup: Setup, ports: list[int], partitions: int, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    owned: list[float] = []
    while time.monotonic() < deadline:
        owned = [scrape(p, "stream_infer_assigned_partitions") for p in ports]
        if sum(owned) == partitions and all(owned):
            return
        time.sleep(0.2)
    raise AssertionError(
        f"input partitions owned {owned}, not {partitions}\n" + setup.worker_logs()
    )


def _produce_to(setup: Setup, topic: str, items: list[tuple[int, bytes, bytes]]) -> None:
    """(partition, key, value) records, each to the partition it names."""
    producer = Producer({"bootstrap.servers": setup.bootstrap} | setup.client_conf)
    for partition, key, value in items:
        producer.produce(topic, value, key, partition=partition)
        producer.poll(0)
    assert producer.flush(30) == 0


def _joined(ports: list[int]) -> float:
    return sum(scrape(p, "stream_infer_labels_total", status="joined") for p in ports)


# --- 1. partitions added under load ----------------------------------------------------------


# CI runs the default protocol (classic); the consumer protocol is a soak variant.
@pytest.mark.parametrize(
    "protocol",
    ["classic", pytest.param("consumer", marks=[pytest.mark.soak, pytest.mark.timeout(900)])],
)
def test_partitions_added_under_load_are_consumed_and_their_labels_joined(
    make_setup: Any, protocol: str
) -> None:
    """Input and labels topics grow from 2 to 4 partitions while 2 workers serve a steady load:
    the new partitions are assigned, every event produced to them is served, and every label
    produced to the same new partition number is joined (the assignment stays co-partitioned)."""
    refresh_ms = 3000
    setup = make_setup(
        topics={"partitions": 2},
        kafka=PROTOCOLS[protocol] | {"metadata_refresh_ms": refresh_ms},
        online=ONLINE,
    )
    ports = _start(setup, 2, partitions=2)
    load = OpenLoopProducer(
        {"bootstrap.servers": setup.bootstrap},
        setup.topics.input,
        iter(good_events(10**6)),
        rate=200,
    ).start()
    time.sleep(2)
    added_at = time.time()
    _add_partitions(setup, {setup.topics.input: 4, setup.topics.labels: 4})
    # Events to the new partitions only; labels to the same partition numbers.
    new = [
        (2 + i % 2, key, value)
        for i, (key, value) in enumerate(good_events(200, prefix="new"))
        if key is not None
    ]
    _produce_to(setup, setup.topics.input, new)
    labels = [
        (p, key, orjson.dumps({"id": orjson.loads(value)["id"], "label": True}))
        for p, key, value in new
    ]
    _produce_to(setup, setup.topics.labels, labels)
    preds = setup.collect_until_ids(
        setup.topics.predictions, {f"new-{i}" for i in range(200)}, timeout_s=60
    )
    served = [p["served_at"] for p in preds if p["id"].startswith("new-")]
    _owned(setup, ports, partitions=4)
    load.stop()
    assert load.errors == 0
    background = setup.collect_until_ids(
        setup.topics.predictions, {f"e-{i}" for i in range(load.sent)}, timeout_s=60
    )
    deadline = time.monotonic() + 30
    while _joined(ports) < len(labels) and time.monotonic() < deadline:
        time.sleep(0.5)
    joined = _joined(ports)
    print(
        f"\n{protocol}: new partitions served {min(served) - added_at:.1f} s after they were "
        f"added (metadata refresh {refresh_ms / 1000:g} s), all {len(new)} of their events "
        f"{max(served) - added_at:.1f} s after; {joined:.0f} of {len(labels)} labels joined; "
        f"{load.sent} events under load, "
        f"{len(background) - len({p['id'] for p in background})} duplicates"
    )
    assert {p["id"] for p in preds} >= {f"new-{i}" for i in range(200)}
    assert {p["id"] for p in background} >= {f"e-{i}" for i in range(load.sent)}
    assert joined == len(labels)
    for port in ports:
        assert_healthy(port)


# --- 2. input and labels partitioned differently ----------------------------------------------


def test_input_and_labels_partitioned_differently_are_reported_then_refused(
    make_setup: Any,
) -> None:
    """At runtime: /healthz (still 200: a restart cannot mend it) and an ERROR line name both
    topics and counts, and clear once the counts match again. A worker (re)started meanwhile
    serves with the same ERROR and warning: after a scale-out of the input topic alone, exiting
    would make the next rollout an outage. Only `stream-infer topics` refuses (exit code 2)."""
    setup = make_setup(topics={"partitions": 2}, online=ONLINE)
    (port,) = _start(setup, 1, partitions=2)
    added_at = time.monotonic()
    _add_partitions(setup, {setup.topics.input: 3})
    expected = (
        f"the input topic {setup.topics.input!r} has 3 partitions and the labels topic "
        f"{setup.topics.labels!r} has 2: the label join needs both partitioned alike"
    )
    deadline = time.monotonic() + 30
    status, body = health(port)
    while "warnings" not in body and time.monotonic() < deadline:
        time.sleep(0.2)
        status, body = health(port)
    seen_s = time.monotonic() - added_at
    assert status == 200 and body["ok"] and len(body["warnings"]) == 1, body
    assert body["warnings"][0].startswith(expected)
    assert "labels cannot be joined any more: " + expected in setup.worker_logs()

    second = free_port()
    restarted = setup.start_worker(web_port=second)
    _owned(setup, [port, second], 3)  # it joined the group and serves
    status, body = health(second)
    assert restarted.poll() is None
    assert status == 200 and body["ok"] and len(body["warnings"]) == 1, body
    assert body["warnings"][0].startswith(expected)
    log = (setup.tmp / "worker-1.log").read_text()
    assert "labels cannot be joined: " + expected in log  # at start, before serving

    refused = _topics_cli(setup.path)
    assert refused.returncode == 2, refused.stderr
    assert expected in refused.stderr

    _add_partitions(setup, {setup.topics.labels: 3})
    deadline = time.monotonic() + 30
    while any("warnings" in health(p)[1] for p in (port, second)):
        assert time.monotonic() < deadline, setup.worker_logs()
        time.sleep(0.2)
    for p in (port, second):
        assert_healthy(p)
    assert "the input and labels topics are partitioned alike again" in setup.worker_logs()
    print(f"\nmismatch reported by /healthz {seen_s:.1f} s after the partition was added")


# --- 3. stream_infer_consumer_lag against Kafka's admin API -------------------------------------


def _kafka_lag(setup: Setup) -> int:
    """The group's lag on the input topic as Kafka's admin API reports it: the latest end
    offsets minus the committed offsets (a partition without a commit counts from 0)."""
    admin = _admin(setup)
    topic = setup.topics.input
    parts = [TopicPartition(topic, p) for p in range(setup.topology.topics.partitions)]
    group = ConsumerGroupTopicPartitions(setup.topology.group_id, parts)
    committed = admin.list_consumer_group_offsets([group])[setup.topology.group_id].result(10)
    done = {tp.partition: max(tp.offset, 0) for tp in committed.topic_partitions}
    ends = admin.list_offsets({tp: OffsetSpec.latest() for tp in parts})
    return sum(fut.result(10).offset - done[tp.partition] for tp, fut in ends.items())


def test_consumer_lag_agrees_with_kafkas_admin_api(make_setup: Any, tmp_path: Path) -> None:
    """Idle, under load, and stuck behind a hung model call (consumption paused, nothing
    committed): the worker's stream_infer_consumer_lag is what Kafka reports for the group,
    as of the worker's last measurement (every 5 s)."""
    model = _faulty_model(tmp_path / "faulty" / "v1")
    setup = make_setup(
        models=[
            {"name": "risk", "serving": "v1", "versions": [{"version": "v1", "path": str(model)}]}
        ],
        limits={"inference_timeout_s": 3600},
        batching={"max_batch_size": 64, "max_wait_ms": 10, "max_batches_in_flight": 2},
    )
    (port,) = _start(setup, 1, partitions=4)
    interval_s = 5.0  # BatchSource.lag_interval_s

    def both() -> tuple[float, int]:
        return scrape(port, "stream_infer_consumer_lag"), _kafka_lag(setup)

    # Under load: each figure the worker shows is what Kafka reported at some moment of the
    # measurement interval before it, up to one second of load (commit interval, sampling).
    rate = 400.0
    load = OpenLoopProducer(
        {"bootstrap.servers": setup.bootstrap},
        setup.topics.input,
        iter(good_events(10**6)),
        rate=rate,
    ).start()
    samples: list[tuple[float, float, int]] = []
    until = time.monotonic() + 8
    while time.monotonic() < until:
        samples.append((time.monotonic(), *both()))
        time.sleep(0.25)
    load.stop()
    worst = 0.0
    for at, ours, _ in samples[len(samples) // 3 :]:
        theirs = [k for t, _, k in samples if at - interval_s - 1 <= t <= at]
        worst = max(worst, min(abs(ours - k) for k in theirs))
    print(
        f"\nunder {rate:.0f} events/s: worker lag {min(s[1] for s in samples):.0f}.."
        f"{max(s[1] for s in samples):.0f}, Kafka {min(s[2] for s in samples)}.."
        f"{max(s[2] for s in samples)}; largest distance to Kafka's figure within the "
        f"interval before it: {worst:.0f} records"
    )
    assert worst <= rate

    # Idle: both come to exactly 0, the worker's within one interval of Kafka's.
    setup.collect_until_ids(setup.topics.predictions, {f"e-{i}" for i in range(load.sent)})
    deadline = time.monotonic() + 30
    while _kafka_lag(setup) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _kafka_lag(setup) == 0
    zero_at = time.monotonic()
    while scrape(port, "stream_infer_consumer_lag") and time.monotonic() < zero_at + 2 * interval_s:
        time.sleep(0.2)
    idle_s = time.monotonic() - zero_at
    assert both() == (0.0, 0)

    # Stuck: a hung call holds its batch, the source pauses with every slot taken. The lag
    # stands still, so the two must be equal, not just close.
    setup.produce(_events("hangs", HANGS, 1) + good_events(600, prefix="after"))
    deadline = time.monotonic() + 60
    ours, theirs = both()
    steady = 0
    while steady < 3 and time.monotonic() < deadline:
        time.sleep(1.0)
        now = both()
        steady = steady + 1 if now == (ours, theirs) and ours == theirs and ours > 0 else 0
        ours, theirs = now
    print(
        f"idle: worker showed 0 {idle_s:.1f} s after Kafka did; stuck: worker {ours:.0f}, "
        f"Kafka {theirs}"
    )
    assert ours == theirs > 0, (ours, theirs)
    for proc in setup.workers:
        proc.kill()  # its hung model call would hold a clean stop for the whole drain timeout


# --- 4. the control topic, as `stream-infer topics` creates or refuses it ------------------------


def _topics_cli(path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    return subprocess.run(
        [sys.executable, "-m", "stream_infer", "topics", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )


def _topology_with_control(setup: Setup, control: str) -> Path:
    """The setup's topology with topics of its own (nothing created yet) and ``control``."""
    doc = dict(setup.doc)
    suffix = uuid.uuid4().hex[:8]
    doc["topics"] = {
        k: (f"{v}-{suffix}" if isinstance(v, str) else v) for k, v in setup.doc["topics"].items()
    } | {"control": control}
    path = setup.tmp / f"topics-{suffix}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_topics_creates_the_control_topic_for_good_and_refuses_one_that_loses_commands(
    make_setup: Any,
) -> None:
    setup = make_setup()
    admin = _admin(setup)
    fresh = f"ctl-{uuid.uuid4().hex[:8]}"
    done = _topics_cli(_topology_with_control(setup, fresh))
    assert done.returncode == 0, done.stderr
    assert fresh in done.stdout
    assert len(admin.list_topics(fresh, timeout=10).topics[fresh].partitions) == 1
    resource = ConfigResource(ResourceType.TOPIC, fresh)
    config = admin.describe_configs([resource])[resource].result(10)
    assert {k: config[k].value for k in ("retention.ms", "retention.bytes", "cleanup.policy")} == {
        "retention.ms": "-1",
        "retention.bytes": "-1",
        "cleanup.policy": "delete",
    }

    cases = {
        "partitions": (NewTopic(f"ctl-3p-{uuid.uuid4().hex[:8]}", 3, 1), "has 3 partitions"),
        "retention": (
            NewTopic(f"ctl-7d-{uuid.uuid4().hex[:8]}", 1, 1),  # Kafka's default: 7 days
            "has retention.ms=604800000 with cleanup.policy=delete: commands would be deleted",
        ),
        "compacted": (
            NewTopic(f"ctl-c-{uuid.uuid4().hex[:8]}", 1, 1, config={"cleanup.policy": "compact"}),
            "is compacted: only the last record of each key is kept",
        ),
    }
    for fut in admin.create_topics([topic for topic, _ in cases.values()]).values():
        fut.result(30)
    for case, (topic, said) in cases.items():
        done = _topics_cli(_topology_with_control(setup, topic.topic))
        where = f"{case}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
        assert done.returncode == 2, where
        assert f"error: control topic {topic.topic!r} {said}" in done.stderr, where
