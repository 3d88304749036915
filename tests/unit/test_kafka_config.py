"""The consumer group protocol setting and its librdkafka mapping; the checks of existing topics
(control topic, co-partitioned input and labels) against a fake admin client."""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from stream_infer.errors import ConfigError
from stream_infer.io import clients
from stream_infer.io.clients import (
    check_topology_topics,
    consumer_config,
    copartition_problem,
)
from stream_infer.settings import Topology, parse_topology
from tests.unit.test_settings import config_error, minimal

# --- kafka.group_protocol -------------------------------------------------------------------


def test_classic_is_the_default_with_range_assignment_and_the_session_timeout() -> None:
    conf = consumer_config(parse_topology(minimal(), env={}).kafka, "g")
    assert "group.protocol" not in conf  # librdkafka's default, classic
    assert conf["partition.assignment.strategy"] == "range"
    assert conf["session.timeout.ms"] == 30_000  # outlasts a group coordinator's failover
    assert conf["heartbeat.interval.ms"] == 3_000  # not 6 s: rebalances are seen by heartbeat
    assert "group.remote.assignor" not in conf


def test_the_consumer_protocol_assigns_on_the_broker_with_range_and_no_classic_properties() -> None:
    topo = parse_topology(minimal(kafka={"group_protocol": "consumer"}), env={})
    conf = consumer_config(topo.kafka, "g")
    assert conf["group.protocol"] == "consumer"
    # The broker's default assignor (uniform) does not co-partition the input and labels topics.
    assert conf["group.remote.assignor"] == "range"
    for classic in ("session.timeout.ms", "heartbeat.interval.ms", "partition.assignment.strategy"):
        assert classic not in conf


def test_the_group_protocol_can_come_from_the_env() -> None:
    env = {"STREAM_INFER_KAFKA__GROUP_PROTOCOL": "consumer"}
    assert parse_topology(minimal(), env=env).kafka.group_protocol == "consumer"


def test_partitions_added_are_seen_within_the_metadata_refresh() -> None:
    topo = parse_topology(minimal(kafka={"metadata_refresh_ms": 5000}), env={})
    assert consumer_config(topo.kafka, "g")["topic.metadata.refresh.interval.ms"] == 5000
    default = parse_topology(minimal(), env={})
    assert consumer_config(default.kafka, "g")["topic.metadata.refresh.interval.ms"] == 30_000


def test_an_idle_fetch_waits_the_configured_time() -> None:
    """Issue seen: fetches every 10 ms kept the broker busy with an idle worker (measured on
    Apache Kafka: broker 15.9 % of a core at 10 ms, 5.9 % at 100 ms)."""
    default = parse_topology(minimal(), env={})
    assert consumer_config(default.kafka, "g")["fetch.wait.max.ms"] == 100
    env = {"STREAM_INFER_KAFKA__FETCH_WAIT_MAX_MS": "10"}
    assert consumer_config(parse_topology(minimal(), env=env).kafka, "g")["fetch.wait.max.ms"] == 10
    assert "fetch_wait_max_ms" in config_error(minimal(kafka={"fetch_wait_max_ms": 0}))


@pytest.mark.parametrize(
    ("kafka", "fragment"),
    [
        ({"group_protocol": "eager"}, "kafka.group_protocol: Input should be 'classic' or"),
        (
            {"group_protocol": "consumer", "session_timeout_ms": 6000},
            "session_timeout_ms: classic-protocol settings, refused with group_protocol consumer",
        ),
        (
            {"group_protocol": "consumer", "extra": {"heartbeat.interval.ms": 500}},
            "heartbeat.interval.ms: classic-protocol settings",
        ),
        (
            {"extra": {"partition.assignment.strategy": "cooperative-sticky"}},
            "extra.partition.assignment.strategy is set by stream-infer from kafka.group_protocol",
        ),
        ({"extra": {"group.protocol": "consumer"}}, "extra.group.protocol is set by stream-infer"),
        (
            {"group_protocol": "consumer", "extra": {"group.remote.assignor": "uniform"}},
            "extra.group.remote.assignor is set by stream-infer from kafka.group_protocol "
            "(consumer); the label join needs co-partitioned (range) assignment",
        ),
        ({"metadata_refresh_ms": 10}, "kafka.metadata_refresh_ms: Input should be greater"),
    ],
    ids=["unknown", "session", "heartbeat", "strategy", "protocol-extra", "assignor", "refresh"],
)
def test_group_settings_that_cannot_work_are_refused(kafka: dict[str, Any], fragment: str) -> None:
    assert fragment in config_error(minimal(kafka=kafka))


def test_the_classic_protocol_keeps_its_session_settings_in_extra() -> None:
    topo = parse_topology(minimal(kafka={"extra": {"heartbeat.interval.ms": 700}}), env={})
    assert consumer_config(topo.kafka, "g")["heartbeat.interval.ms"] == 700


# --- checks of existing topics ----------------------------------------------------------------


@dataclass
class _Topic:
    partitions: dict[int, object]
    error: object = None


@dataclass
class _Entry:
    value: str | None


@dataclass
class FakeAdmin:
    """list_topics and describe_configs, as much of AdminClient as the checks use."""

    partitions: dict[str, int]
    configs: dict[str, dict[str, str]] = field(default_factory=dict)
    describe_error: KafkaException | None = None
    describe_hangs: bool = False  # the future is never answered

    def list_topics(self, timeout: float) -> Any:
        topics = {n: _Topic(dict.fromkeys(range(k))) for n, k in self.partitions.items()}
        return type("Meta", (), {"topics": topics})()

    def describe_configs(self, resources: list[Any], request_timeout: float) -> Any:
        fut: Future[dict[str, _Entry]] = Future()
        if self.describe_hangs:
            pass
        elif self.describe_error is not None:
            fut.set_exception(self.describe_error)
        else:
            config = self.configs.get(resources[0].name, {})
            fut.set_result({k: _Entry(v) for k, v in config.items()})
        return {resources[0]: fut}


INFINITE = {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"}


def topology(online: bool = True) -> Topology:
    data = minimal()
    data["topics"] = data["topics"] | {"labels": "t.labels"}
    if online:
        data["online"] = {"learners": [{"model": data["models"][0]["name"]}]}
    return parse_topology(data, env={})


def admin_for(topo: Topology, **over: Any) -> FakeAdmin:
    parts = dict.fromkeys(topo.all_topics(), 4) | {topo.topics.control: 1}
    parts |= over.pop("partitions", {})
    configs = {topo.topics.control: dict(INFINITE) | over.pop("control", {})}
    return FakeAdmin(parts, configs, **over)


def test_topics_as_created_pass_without_warnings() -> None:
    topo = topology()
    assert check_topology_topics(topo, admin_for(topo)) == []


def test_a_control_topic_with_more_than_one_partition_is_refused() -> None:
    topo = topology()
    admin = admin_for(topo, partitions={topo.topics.control: 3})
    with pytest.raises(ConfigError) as info:
        check_topology_topics(topo, admin)
    assert str(info.value).startswith(
        f"control topic {topo.topics.control!r} has 3 partitions, expected 1"
    )


@pytest.mark.parametrize(
    ("config", "said"),
    [
        ({"retention.ms": "604800000"}, "retention.ms=604800000 with cleanup.policy=delete"),
        ({"retention.bytes": "1048576"}, "retention.bytes=1048576 with cleanup.policy=delete"),
        (
            {"cleanup.policy": "compact,delete", "retention.ms": "86400000"},
            "retention.ms=86400000 with cleanup.policy=compact,delete",
        ),
    ],
    ids=["time", "size", "compact-and-delete"],
)
def test_a_control_topic_with_finite_retention_is_refused(
    config: dict[str, str], said: str
) -> None:
    topo = topology()
    with pytest.raises(ConfigError) as info:
        check_topology_topics(topo, admin_for(topo, control=config))
    message = str(info.value)
    assert f"control topic {topo.topics.control!r} has {said}: commands would be deleted" in message
    assert "--add-config retention.ms=-1,retention.bytes=-1" in message


@pytest.mark.parametrize("policy", ["compact", "compact,delete"])
def test_a_compacted_control_topic_is_refused(policy: str) -> None:
    """Copies of one command share a key (policy copies from several workers): compaction
    keeps the last copy, which every worker that read them in order rejected as a duplicate."""
    topo = topology()
    admin = admin_for(topo, control={"cleanup.policy": policy})
    with pytest.raises(ConfigError) as info:
        check_topology_topics(topo, admin)
    message = str(info.value)
    assert message.startswith(f"control topic {topo.topics.control!r} is compacted")
    assert "--add-config cleanup.policy=delete,retention.ms=-1,retention.bytes=-1" in message


def test_a_maximum_command_age_needs_the_brokers_timestamps() -> None:
    data = minimal()
    data["topics"] = data["topics"] | {"labels": "t.labels"}
    data["control"] = {"max_command_age_s": 60}
    topo = parse_topology(data, env={})
    with pytest.raises(ConfigError) as info:
        check_topology_topics(topo, admin_for(topo))
    assert "--add-config message.timestamp.type=LogAppendTime" in str(info.value)
    admin = admin_for(topo, control={"message.timestamp.type": "LogAppendTime"})
    assert check_topology_topics(topo, admin) == []


def test_an_unreadable_control_topic_configuration_is_a_warning() -> None:
    topo = topology()
    refused = KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED))
    dead_letter, control = check_topology_topics(topo, admin_for(topo, describe_error=refused))
    assert dead_letter.startswith(
        f"cannot read the configuration of dead-letter topic {topo.topics.dead_letter!r}"
    )
    assert control.startswith(
        f"cannot read the configuration of control topic {topo.topics.control!r}"
    )


def test_a_broker_that_reports_no_retention_is_a_warning() -> None:
    topo = topology()
    admin = admin_for(topo)
    admin.configs[topo.topics.control] = {}  # seen on tansu: only explicit settings reported
    (warning,) = check_topology_topics(topo, admin)
    assert "did not report retention.ms, retention.bytes" in warning


def test_input_and_labels_partitioned_differently_are_refused_when_labels_are_joined() -> None:
    """Refused by `stream-infer topics` (refuse_copartition), where the operator makes them."""
    topo = topology()
    admin = admin_for(topo, partitions={topo.topics.labels: 6})
    with pytest.raises(ConfigError) as info:
        check_topology_topics(topo, admin, refuse_copartition=True)
    assert str(info.value).startswith(
        f"the input topic {topo.topics.input!r} has 4 partitions and the labels topic "
        f"{topo.topics.labels!r} has 6: the label join needs both partitioned alike"
    )
    assert f"--alter --topic {topo.topics.input} --partitions 6" in str(info.value)
    # Without online learning the labels topic is not read: nothing to refuse.
    plain = topology(online=False)
    plain_admin = admin_for(plain, partitions={plain.topics.labels: 6})
    assert check_topology_topics(plain, plain_admin, refuse_copartition=True) == []


def test_a_worker_starting_on_input_and_labels_partitioned_differently_logs_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A scale-out of the input topic alone must not make every restarted worker exit 2 (the
    next rollout an outage): an ERROR naming both topics and counts and what becomes of the
    labels; the running worker's /healthz warns as it does for a mismatch seen at runtime."""
    topo = topology()
    admin = admin_for(topo, partitions={topo.topics.input: 6})
    with caplog.at_level(logging.ERROR):
        assert check_topology_topics(topo, admin) == []
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert line.startswith(
        f"labels cannot be joined: the input topic {topo.topics.input!r} has 6 partitions and "
        f"the labels topic {topo.topics.labels!r} has 4"
    )
    assert "is never joined (the event counts in stream_infer_labels_missed_total)" in line


def test_a_control_topic_retained_for_long_max_counts_as_infinite() -> None:
    """9223372036854775807 (Long.MAX_VALUE) is a common "infinite" retention.ms."""
    topo = topology()
    admin = admin_for(topo, control={"retention.ms": str(2**63 - 1)})
    assert check_topology_topics(topo, admin) == []
    admin = admin_for(topo, control={"retention.ms": str(2**61)})  # 73 million years: finite
    with pytest.raises(ConfigError):
        check_topology_topics(topo, admin)


def test_a_control_topic_configuration_that_never_comes_is_a_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The future unanswered within its timeout raises TimeoutError (Python >= 3.11), not
    KafkaException: it crashed the start-up."""
    topo = topology()
    admin = admin_for(topo)
    admin.describe_hangs = True
    monkeypatch.setattr(clients, "FUTURE_GRACE_S", 0.0)
    _dead_letter, control = check_topology_topics(topo, admin, timeout_s=0.05)
    assert control.startswith(
        f"cannot read the configuration of control topic {topo.topics.control!r}"
    )


def test_copartition_problem_needs_both_counts() -> None:
    assert copartition_problem({"in": 4, "lab": 4}, "in", "lab") is None
    assert copartition_problem({"in": 4}, "in", "lab") is None
    problem = copartition_problem({"in": 8, "lab": 4}, "in", "lab")
    assert problem is not None
    assert "Add partitions to 'lab' to match 'in'" in problem


# --- dead letters fit (hardening item 6) ----------------------------------------------------


def test_a_dead_letter_topic_too_small_for_the_largest_dead_letter_is_refused() -> None:
    topo = topology()
    dead_letter = topo.topics.dead_letter
    admin = admin_for(topo)
    admin.configs[dead_letter] = {"max.message.bytes": "100000"}
    with pytest.raises(ConfigError) as info:
        check_topology_topics(topo, admin)
    message = str(info.value)
    assert f"dead-letter topic {dead_letter!r} has max.message.bytes=100000" in message
    assert f"--add-config max.message.bytes={512 * 1024 + 1024}" in message


def test_a_dead_letter_topic_large_enough_passes() -> None:
    topo = topology()
    admin = admin_for(topo)
    admin.configs[topo.topics.dead_letter] = {"max.message.bytes": "1048588"}
    assert check_topology_topics(topo, admin) == []


def test_a_dead_letter_cap_over_the_producers_limit_is_refused() -> None:
    data = minimal()
    data["limits"] = {"max_dead_letter_bytes": 2 * 1024 * 1024}
    with pytest.raises(ConfigError) as info:
        parse_topology(data, env={})
    assert "limits.max_dead_letter_bytes=2097152 does not fit in the producer's " in str(info.value)
    data["kafka"] = {"producer_extra": {"message.max.bytes": 4 * 1024 * 1024}}
    assert parse_topology(data, env={}).limits.max_dead_letter_bytes == 2 * 1024 * 1024
