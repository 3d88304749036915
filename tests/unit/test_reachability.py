"""A cluster that cannot be reached makes /readyz 503 past the grace and /healthz warn (200: a
restart brings no broker back); a topic the cluster no longer has is a /healthz problem (500: a
restart creates it again). Fake clocks and fake consumers, no broker, no sleeps."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest
from confluent_kafka import KafkaError, KafkaException

from stream_infer.io.reachability import Reachability, no_broker_answered
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
    assert source.vanished == () and source.partition_counts == {"in": 2}
    cluster.existing = {"ctl"}  # deleted, or the broker came back empty
    source._measure_lag(cast(Any, cluster))
    assert source.vanished == ()  # one answer may come from a broker not caught up yet
    source._measure_lag(cast(Any, cluster))
    assert source.vanished == ("in", "out")
    assert source.partition_counts == {"in": 2}  # the last count known stays


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
    assert reach.unreachable_for_s() == 15.0 and source.vanished == ()
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
    clock = Clock()
    runtime.kafka.reachability = Reachability(clock)
    runtime.kafka.publisher = cast(Any, _StuckPublisher())
    status, body = runtime.health()
    assert status == 500 and "deliveries are stuck" in body["problems"][0]
    runtime.kafka.reachability.lost("no broker answers the producer")
    clock.now += 31.0  # past the grace: the warning says it
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
        "topics gone since this worker started (deleted, the broker lost its data, or created "
        "anew, empty): in, out; a restart is needed even if they are back (it creates what is "
        "missing and rebuilds the routing from the control log as it is now)"
    ]
    assert runtime.not_ready_reason is None  # serving what it can; liveness restarts it


# --- review of the outage handling (issue 18 item 7) -----------------------------------------


class _SlowCluster(_Cluster):
    """Reachable but slow: every metadata answer takes ``rtt_s``; a request given less than
    that times out (after its timeout), as librdkafka's does."""

    def __init__(self, *existing: str, rtt_s: float) -> None:
        super().__init__(*existing)
        self.rtt_s = rtt_s

    def list_topics(self, topic: str, timeout: float) -> Any:
        if timeout < self.rtt_s:
            time.sleep(timeout)
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "Local: Timed out"))
        time.sleep(self.rtt_s)
        return super().list_topics(topic, timeout)

    def get_watermark_offsets(self, tp: Any, timeout: float = 0, cached: bool = False) -> Any:
        return 0, 100


def test_a_slow_reachable_cluster_is_no_outage_and_the_lag_is_still_measured(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Metadata answered in 0.1 s, six topics: the refresh's last request, given what was
    left of its budget, timed out: that was 'Kafka unreachable' on every refresh, and the lag
    probe, sharing the budget, measured nothing."""
    reach = Reachability()
    source = BatchSource(
        {},
        ["in", "labels"],
        max_batch_size=1,
        max_wait_ms=1,
        max_in_flight=1,
        hand_off=lambda _: None,
        reachability=reach,
        watched=["out", "dlq", "ctl", "acks"],
    )
    source.metadata_timeout_s = source.metadata_budget_s = source.lag_budget_s = 0.25
    source.assignment = [("in", 0)]
    source._positions = {("in", 0): 40}
    cluster = _SlowCluster("in", "labels", "out", "dlq", "ctl", "acks", rtt_s=0.1)
    caplog.set_level(logging.INFO, logger="stream_infer.io.reachability")
    for _ in range(4):
        source._measure_lag(cast(Any, cluster))
    assert reach.down_since is None and caplog.records == []
    assert source.lag == {("in", 0): 60}
    # The watched topics are taken in turn: each is asked, none skipped for good.
    assert set(cluster.asked) == {"in", "labels", "out", "dlq", "ctl", "acks"}


def test_a_timed_out_metadata_request_is_an_outage_only_with_its_whole_timeout() -> None:
    assert not no_broker_answered(KafkaError(KafkaError._TIMED_OUT), full_timeout=False)
    assert no_broker_answered(KafkaError(KafkaError._TIMED_OUT), full_timeout=True)
    for code in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._RESOLVE):
        assert no_broker_answered(KafkaError(code), full_timeout=False)
    assert not no_broker_answered(KafkaError(KafkaError.LEADER_NOT_AVAILABLE), full_timeout=True)
    # A cluster that does not answer a request given its whole timeout is down.
    reach = Reachability()
    source = _source(reach)
    source.metadata_timeout_s = source.metadata_budget_s = source.lag_budget_s = 0.05
    source._measure_lag(cast(Any, _SlowCluster("in", "out", "ctl", rtt_s=1.0)))
    assert reach.why == "a metadata request failed: Local: Timed out"


def test_lost_and_regained_lines_are_logged_once_per_interval_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    reach = Reachability(clock)
    caplog.set_level(logging.INFO, logger="stream_infer.io.reachability")
    for _ in range(10):  # a flapping mark
        reach.lost("a metadata request failed")
        clock.now += 1.0
        reach.reached()
        clock.now += 1.0
    assert reach.down_since is None  # the state follows every change; the log does not
    assert [r.getMessage().split(";")[0] for r in caplog.records] == [
        "Kafka unreachable: a metadata request failed",
        "Kafka reachable again after 1.0 s",
    ]
    clock.now += 30.0
    assert reach.flush_due() == 2  # the report timer says what was suppressed
    assert [r.getMessage().split(";")[0] for r in caplog.records[2:]] == [
        "Kafka unreachable: a metadata request failed",
        "Kafka reachable again after 1.0 s (9 like it in the last 49 s)",
    ]


def test_stuck_deliveries_are_a_problem_until_the_unreachable_warning_shows(
    runtime: InferenceRuntime,
) -> None:
    """A mark younger than the grace hid the stuck deliveries: neither a problem nor a warning."""
    clock = Clock()
    runtime.kafka.reachability = reach = Reachability(clock)
    runtime.kafka.publisher = cast(Any, _StuckPublisher())
    reach.lost("a metadata request failed: Local: Timed out")
    clock.now += 4.9
    status, body = runtime.health()
    assert status == 500 and "deliveries are stuck" in body["problems"][0]
    assert "warnings" not in body
    clock.now += 30.0  # past the grace: the warning says it, the problem does not
    status, body = runtime.health()
    assert status == 200 and body["problems"] == []
    assert body["warnings"][0].startswith("Kafka unreachable for 35 s")


def test_the_unreachable_reason_reads_one_outage(runtime: InferenceRuntime) -> None:
    """The outage ending between reading its age and its cause gave 'unreachable (None; ...)'."""

    class EndsWhileRead(Reachability):
        def unreachable_for_s(self) -> float:
            age = super().unreachable_for_s()
            self.reached()  # another thread's answer, between two reads
            return age

    clock = Clock()
    reach = runtime.kafka.reachability = EndsWhileRead(clock)
    reach.lost("no broker answers the producer")
    clock.now += 31.0
    assert runtime.unreachable_reason == (
        "Kafka unreachable for 31 s (no broker answers the producer; limits.unreachable_grace_s=30)"
    )


def test_a_vanished_topic_stays_reported_when_it_reappears(runtime: InferenceRuntime) -> None:
    """A control topic deleted then created again, empty, by a restarted peer: the workers not
    restarted yet kept the old routing in memory and turned healthy, serving another routing
    than the restarted ones."""
    source = _source(runtime.kafka.reachability)
    runtime.kafka.source = source
    cluster = _Cluster("in", "out")
    for _ in range(2):
        source._measure_lag(cast(Any, cluster))
    assert list(source.vanished) == ["ctl"]
    cluster.existing.add("ctl")  # re-created by a restarted peer
    source._measure_lag(cast(Any, cluster))
    assert list(source.vanished) == ["ctl"]
    status, body = runtime.health()
    assert status == 500
    assert body["problems"] == [
        "topics gone since this worker started (deleted, the broker lost its data, or created "
        "anew, empty): ctl; a restart is needed even if they are back (it creates what is "
        "missing and rebuilds the routing from the control log as it is now)"
    ]


def test_vanished_is_published_whole_by_the_consumer_thread() -> None:
    """/healthz iterated the consumer thread's dict: 'dictionary changed size during iteration'."""
    source = _source(Reachability())
    source.watched = [f"t{i}" for i in range(50)]
    gone, here = _Topic(False), _Topic(True)
    stop = threading.Event()

    def consumer_thread() -> None:
        while not stop.is_set():
            for i in range(50):
                source._note_exists(f"t{i}", gone)
            for i in range(50):
                source._note_exists(f"t{i}", here)

    thread = threading.Thread(target=consumer_thread, daemon=True)
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    errors = []
    try:
        thread.start()
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            try:
                vanished = source.vanished
            except RuntimeError as exc:
                errors.append(exc)
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(before)
    assert errors == []
    assert isinstance(vanished, tuple)


class _Fetched:
    """A record from librdkafka's queue (maybe prefetched before the outage began)."""

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return "in"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return 0

    def timestamp(self) -> tuple[int, int]:
        return (0, -1)


class _Queue(_Cluster):
    def store_offsets(self, offsets: Any) -> None:
        pass

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Any]:
        return [_Fetched()]


def test_records_from_the_queue_ask_the_cluster_soon_instead_of_clearing_an_outage() -> None:
    """Up to 16 MiB prefetched before the outage kept clearing its mark (and its grace)."""
    reach = Reachability()
    source = _source(reach)
    source._slots = threading.BoundedSemaphore(10)  # room for every batch handed over here
    consumer = _Queue("in", "out", "ctl")
    source._measure_lag(cast(Any, consumer))
    consumer.down = True
    source._step(cast(Any, consumer))  # the next refresh is not due yet: records only
    reach.lost("no broker answers the consumer")
    source._step(cast(Any, consumer))
    assert reach.down_since is not None, "records from the queue are no fresh answer"
    assert source._lag_due <= source._measured_at + source.metadata_timeout_s
    consumer.down = False
    time.sleep(source.metadata_timeout_s)
    source._step(cast(Any, consumer))  # the refresh brought forward: the cluster answers
    assert reach.down_since is None
