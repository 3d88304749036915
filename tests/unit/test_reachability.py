"""A cluster that cannot be reached makes /readyz 503 past the grace and /healthz warn (200: a
restart brings no broker back); a topic the cluster no longer has is a /healthz problem (500: a
restart creates it again). Fake clocks and fake consumers, no broker, no sleeps."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, cast

import pytest
from confluent_kafka import KafkaError, KafkaException

from stream_infer.io.reachability import Reachability
from stream_infer.io.source import BatchSource
from stream_infer.runtime.worker import InferenceRuntime
from stream_infer.settings import parse_topology
from tests.unit.test_settings import minimal


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_every_broker_down_is_an_outage_until_any_broker_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    reach = Reachability(clock)
    caplog.set_level(logging.INFO, logger="stream_infer.io.reachability")
    producer, consumer = reach.error_cb("the producer"), reach.error_cb("the consumer")
    producer(KafkaError(KafkaError._TRANSPORT, "1/1 brokers"))  # one connection: the log says it
    assert reach.down_since is None and caplog.records == []
    producer(KafkaError(KafkaError._ALL_BROKERS_DOWN, "2/2 brokers are down"))
    clock.now += 7.0
    consumer(KafkaError(KafkaError._ALL_BROKERS_DOWN, "2/2 brokers are down"))  # still since 1000
    assert reach.unreachable_for_s() == 7.0
    assert reach.why == "no broker answers the producer (2/2 brokers are down)"
    clock.now += 5.0
    reach.reached()  # any client's answer: the consumer's metadata, a delivery
    assert reach.down_since is None and reach.unreachable_for_s() == 0.0
    assert [r.getMessage().split(";")[0] for r in caplog.records] == [
        "Kafka unreachable: no broker answers the producer (2/2 brokers are down)",
        "Kafka reachable again after 12.0 s",
    ]


def test_other_client_errors_are_logged_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reach = Reachability(Clock())
    caplog.set_level(logging.INFO, logger="stream_infer.io.reachability")
    on_error = reach.error_cb("the producer")
    for _ in range(50):
        on_error(KafkaError(KafkaError._AUTHENTICATION, "SASL failed"))
    assert [r.getMessage() for r in caplog.records] == ["the producer: SASL failed"]
    assert reach.down_since is None


# --- the consumer thread's metadata refresh --------------------------------------------------


class _Topic:
    def __init__(self, exists: bool) -> None:
        self.error = None if exists else KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)
        self.partitions = {0: None, 1: None} if exists else {}


class _Cluster:
    """A consumer answering metadata for the topics in ``existing``, or none (down)."""

    def __init__(self, *existing: str) -> None:
        self.existing = set(existing)
        self.down = False
        self.asked: list[str] = []

    def list_topics(self, topic: str, timeout: float) -> Any:
        self.asked.append(topic)
        if self.down:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "Failed to get metadata"))
        found = {topic: _Topic(topic in self.existing)}
        return type("Metadata", (), {"topics": found})()

    def get_watermark_offsets(self, tp: Any, timeout: float = 0, cached: bool = False) -> Any:
        return 0, 0


def _source(reach: Reachability) -> BatchSource:
    return BatchSource(
        {},
        ["in"],
        max_batch_size=1,
        max_wait_ms=1,
        max_in_flight=1,
        hand_off=lambda _: None,
        reachability=reach,
        watched=["out", "in", "ctl"],
    )


def test_a_topic_absent_from_two_metadata_answers_running_has_vanished() -> None:
    source = _source(Reachability(Clock()))
    cluster = _Cluster("in", "out", "ctl")
    source._measure_lag(cast(Any, cluster))
    assert cluster.asked == ["in", "out", "ctl"]  # subscribed and watched, each once
    assert source.vanished == [] and source.partition_counts == {"in": 2}
    cluster.existing = {"ctl"}  # deleted, or the broker came back empty
    source._measure_lag(cast(Any, cluster))
    assert source.vanished == []  # one answer may come from a broker not caught up yet
    source._measure_lag(cast(Any, cluster))
    assert source.vanished == ["in", "out"]
    assert source.partition_counts == {"in": 2}  # the last count known stays
    cluster.existing = {"in", "out", "ctl"}
    source._measure_lag(cast(Any, cluster))
    assert source.vanished == []


def test_metadata_no_broker_answers_is_an_outage_and_counts_no_topic_absent() -> None:
    clock = Clock()
    reach = Reachability(clock)
    source = _source(reach)
    cluster = _Cluster("in", "out", "ctl")
    cluster.down = True
    for _ in range(3):
        source._measure_lag(cast(Any, cluster))
        clock.now += 5.0
    assert cluster.asked == ["in"] * 3  # the first failure ends the refresh
    assert reach.unreachable_for_s() == 15.0 and source.vanished == []
    assert reach.why == "a metadata request failed: Failed to get metadata"
    cluster.down = False
    source._measure_lag(cast(Any, cluster))
    assert reach.down_since is None


# --- the runtime's answers --------------------------------------------------------------------


@pytest.fixture
def runtime() -> Iterator[InferenceRuntime]:
    topics = {"input": "in", "predictions": "out", "dead_letter": "dlq", "control": "ctl"}
    topology = parse_topology(
        minimal(topics=topics, limits={"unreachable_grace_s": 30, "max_unacked_s": 60}), env={}
    )
    rt = InferenceRuntime(topology)
    rt.ready = True  # started (nothing else of it runs here)
    yield rt
    rt.threads.inference.shutdown(wait=False)
    rt.threads.loader.shutdown(wait=False)


def test_readiness_fails_only_past_the_grace_and_health_only_warns(
    runtime: InferenceRuntime,
) -> None:
    clock = Clock()
    reach = runtime.kafka.reachability = Reachability(clock)
    assert runtime.not_ready_reason is None
    reach.lost("no broker answers the consumer (1/1 brokers are down)")
    clock.now += 30.0
    assert runtime.not_ready_reason is None and "warnings" not in runtime.health()[1]
    clock.now += 1.0
    reason = runtime.not_ready_reason
    assert reason == (
        "Kafka unreachable for 31 s (no broker answers the consumer (1/1 brokers are down); "
        "limits.unreachable_grace_s=30)"
    )
    status, body = runtime.health()
    assert status == 200 and body["problems"] == []
    assert body["warnings"] == [
        f"{reason}: nothing is consumed or delivered until a broker answers; the clients keep "
        "reconnecting (a restart would not help)"
    ]
    assert runtime.metrics.registry.get_sample_value("stream_infer_ready") == 0.0
    reach.reached()
    assert runtime.not_ready_reason is None and runtime.health() == (
        200,
        {"ok": True, "problems": []},
    )


class _StuckPublisher:
    oldest_unacked_s = 120.0  # past limits.max_unacked_s=60
    problem = None


def test_deliveries_stuck_during_an_outage_are_not_a_liveness_failure(
    runtime: InferenceRuntime,
) -> None:
    runtime.kafka.publisher = cast(Any, _StuckPublisher())
    status, body = runtime.health()
    assert status == 500 and "deliveries are stuck" in body["problems"][0]
    runtime.kafka.reachability.lost("no broker answers the producer")
    status, body = runtime.health()
    assert status == 200 and body["problems"] == []


def test_a_vanished_topic_is_a_health_problem_naming_it(runtime: InferenceRuntime) -> None:
    source = _source(runtime.kafka.reachability)
    runtime.kafka.source = source
    cluster = _Cluster("ctl")
    for _ in range(2):
        source._measure_lag(cast(Any, cluster))
    status, body = runtime.health()
    assert status == 500
    assert body["problems"] == [
        "topics in, out no longer exist on the cluster (deleted, or the broker lost its data): "
        "nothing is consumed from or delivered to them; a restart creates them again"
    ]
    assert runtime.not_ready_reason is None  # serving what it can; liveness restarts it
