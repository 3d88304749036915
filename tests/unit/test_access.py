"""Refusals (missing ACLs): each refused topic or group reported once, a /healthz warning until
it works again; the publisher and the batch source keep going meanwhile."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any, cast

import pytest
from confluent_kafka import KafkaError, KafkaException, Message

from stream_infer.core.events import OutRecord
from stream_infer.io import publisher as publisher_module
from stream_infer.io.access import AccessRefusals, is_refusal
from stream_infer.io.publisher import Publisher, Ticket
from stream_infer.io.source import BatchSource
from tests.tickets import settled
from tests.unit.test_publisher import Delivery, FakeMessage, FakeProducer, _wait_for

REFUSED = KafkaError.TOPIC_AUTHORIZATION_FAILED


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_authorization_errors_are_refusals_and_others_are_not() -> None:
    for code in (REFUSED, KafkaError.GROUP_AUTHORIZATION_FAILED):
        assert is_refusal(KafkaError(code))
    for code in (
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
    ):
        assert not is_refusal(KafkaError(code))


def test_a_refusal_is_logged_once_and_reported_until_allowed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    access = AccessRefusals(clock)
    assert not access.active and access.problems() == []
    caplog.set_level(logging.INFO, logger="stream_infer.io.access")
    first = access.refused("topic", "t.acks", "Write", "TOPIC_AUTHORIZATION_FAILED")
    assert first is not None
    clock.now += 12
    assert access.refused("topic", "t.acks", "Write", "TOPIC_AUTHORIZATION_FAILED") is None
    assert access.refused("group", "g", "Read", "GROUP_AUTHORIZATION_FAILED") is not None
    assert _errors(caplog) == [
        "Kafka refuses this worker's principal Write on topic 't.acks' "
        "(TOPIC_AUTHORIZATION_FAILED): grant it (docs/production.md, Kafka ACLs); "
        "retrying until then",
        "Kafka refuses this worker's principal Read on group 'g' (GROUP_AUTHORIZATION_FAILED): "
        "grant it (docs/production.md, Kafka ACLs); retrying until then",
    ]
    assert access.active and len(access) == 2
    assert access.problems() == [
        "Kafka has refused this worker's principal Read on group 'g' "
        "(GROUP_AUTHORIZATION_FAILED) for 0 s: grant it",
        "Kafka has refused this worker's principal Write on topic 't.acks' "
        "(TOPIC_AUTHORIZATION_FAILED) for 12 s: grant it",
    ]
    assert access.allowed("topic", "t.other", "Write") is None
    assert access.allowed("topic", "t.acks") is None  # Read worked: says nothing of Write
    assert access.allowed("topic", "t.acks", "Write") == first
    assert access.allowed("topic", "t.acks", "Write") is None
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [
        "Kafka now grants Write on topic 't.acks'"
    ]
    assert len(access) == 1 and access.problems()[0].startswith(
        "Kafka has refused this worker's principal Read on group 'g'"
    )


def test_read_and_write_refusals_of_one_topic_are_reported_and_granted_apart() -> None:
    access = AccessRefusals()
    access.refused("topic", "t", "Read", "TOPIC_AUTHORIZATION_FAILED")
    assert access.refused("topic", "t", "Write", "TOPIC_AUTHORIZATION_FAILED") is not None
    assert len(access) == 2
    assert access.allowed("topic", "t", "Write") is not None  # Write granted, Read still not
    assert [p.split(" for ")[0] for p in access.problems()] == [
        "Kafka has refused this worker's principal Read on topic 't' (TOPIC_AUTHORIZATION_FAILED)"
    ]


class RefusingProducer(FakeProducer):
    """Topics in ``refused`` fail at delivery; those in ``refused_now`` already at produce(),
    as librdkafka does once its metadata says the topic is not authorized."""

    def __init__(self, conf: dict[str, Any]) -> None:
        super().__init__(conf)
        self.refused: set[str] = set()
        self.refused_now: set[str] = set()
        self.attempts: Counter[str] = Counter()

    def produce(self, topic: str, value: bytes, key: bytes | None, on_delivery: Delivery) -> None:
        self.attempts[topic] += 1
        if topic in self.refused_now:
            raise KafkaException(KafkaError(REFUSED))
        super().produce(topic, value, key, on_delivery)

    def poll(self, timeout: float) -> int:
        with self._lock:
            refused = [(m, d) for m, d in self._queue if m.topic() in self.refused]
            self._queue = [(m, d) for m, d in self._queue if m.topic() not in self.refused]
        for msg, on_delivery in refused:
            on_delivery(KafkaError(REFUSED), msg)
        return len(refused) + super().poll(0 if refused else timeout)


@pytest.fixture
def refusing(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[RefusingProducer]]:
    monkeypatch.setattr(publisher_module, "Producer", RefusingProducer)
    yield RefusingProducer
    FakeProducer.last = None


@pytest.mark.parametrize("at_produce", [False, True], ids=["at-delivery", "at-produce"])
def test_a_refused_topic_is_reported_once_retried_slowly_and_holds_only_its_own_records(
    refusing: type[RefusingProducer], caplog: pytest.LogCaptureFixture, at_produce: bool
) -> None:
    retries: list[tuple[str, str]] = []
    access = AccessRefusals()
    pub = Publisher(
        {},
        retry_backoff_s=0.01,
        refused_backoff_s=0.2,
        on_retry=lambda t, e: retries.append((t, e)),
        access=access,
    )
    producer = cast(RefusingProducer, refusing.last)
    (producer.refused_now if at_produce else producer.refused).add("acks")
    ack, preds = Ticket(), Ticket()
    try:
        pub.publish([OutRecord("acks", b"w", b"ack")], ack)  # refused
        pub.publish([OutRecord("preds", b"k", v) for v in (b"p1", b"p2")], preds)
        assert settled(preds, 2.0), "a refused topic held up the records of another"
        _wait_for(lambda: len(retries) >= 3, 3.0)
        assert not ack.done and ack.pending == 1
        assert set(retries) == {("acks", "TOPIC_AUTHORIZATION_FAILED")}
        assert pub._thread.is_alive(), "the refusal killed the poll thread"
        # Slowly: about one attempt per refused_backoff_s, not one per retry_backoff_s.
        assert producer.attempts["acks"] <= 8
        assert [m for m in _errors(caplog) if "refuses" in m] == [
            "Kafka refuses this worker's principal Write on topic 'acks' "
            "(TOPIC_AUTHORIZATION_FAILED): grant it (docs/production.md, Kafka ACLs); "
            "retrying until then"
        ]
        assert not [r for r in caplog.records if "delivery to acks failed" in r.getMessage()]
        assert len(access.problems()) == 1

        producer.refused.clear()  # granted
        producer.refused_now.clear()
        assert settled(ack, 2.0), "the ack was not delivered once Write was granted"
        assert producer.acked == Counter({b"ack": 1, b"p1": 1, b"p2": 1})
        assert access.problems() == []
    finally:
        assert pub.close(timeout_s=1.0) == 0


def test_closing_does_not_wait_for_records_only_a_permission_would_deliver(
    refusing: type[RefusingProducer],
) -> None:
    pub = Publisher({}, refused_backoff_s=0.2)
    producer = cast(RefusingProducer, refusing.last)
    producer.refused.add("acks")
    pub.publish([OutRecord("acks", None, b"ack")], Ticket())
    _wait_for(lambda: pub.access.active, 2.0)
    assert pub.close(timeout_s=20.0) == 1  # reported as undelivered, at once, not in 20 s


class _ErrorRecord:
    def __init__(self, code: int, topic: str | None) -> None:
        self._err, self._topic = KafkaError(code), topic

    def error(self) -> KafkaError:
        return self._err

    def topic(self) -> str | None:
        return self._topic


def test_the_source_reports_a_refused_input_topic_or_group_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = BatchSource(
        {"group.id": "workers"},
        ["in"],
        max_batch_size=10,
        max_wait_ms=10,
        max_in_flight=1,
        hand_off=lambda _batch: None,
    )
    # librdkafka reports a refused fetch once per partition; a refused group at each lookup.
    errors = [_ErrorRecord(REFUSED, "in") for _ in range(4)]
    errors += [_ErrorRecord(KafkaError.GROUP_AUTHORIZATION_FAILED, None) for _ in range(2)]
    errors.append(_ErrorRecord(KafkaError._TRANSPORT, None))
    source._errors(cast(list[Message], errors))
    assert [m.split(":")[0] for m in _errors(caplog)] == [
        "Kafka refuses this worker's principal Read on topic 'in' (TOPIC_AUTHORIZATION_FAILED)",
        "Kafka refuses this worker's principal Read on group 'workers' "
        "(GROUP_AUTHORIZATION_FAILED)",
    ]
    assert [r.levelname for r in caplog.records if "consumer error" in r.getMessage()] == [
        "WARNING"
    ]
    assert len(source.access) == 2
    source._assigned(cast(Any, None), [])  # the group let it join
    assert [p.split(" for ")[0] for p in source.access.problems()] == [
        "Kafka has refused this worker's principal Read on topic 'in' (TOPIC_AUTHORIZATION_FAILED)"
    ]


def test_closing_tries_refused_records_once_more_a_grant_since_delivers_them(
    refusing: type[RefusingProducer],
) -> None:
    pub = Publisher({}, refused_backoff_s=60.0)  # no scheduled retry before close
    producer = cast(RefusingProducer, refusing.last)
    producer.refused.add("acks")
    ticket = Ticket()
    pub.publish([OutRecord("acks", None, b"ack")], ticket)
    _wait_for(lambda: pub.access.active, 2.0)
    producer.refused.clear()  # granted, and the worker is told to stop
    assert pub.close(timeout_s=5.0) == 0
    assert ticket.done and producer.acked == Counter({b"ack": 1})
    assert producer.attempts["acks"] == 2


def test_while_a_topic_is_refused_deliveries_elsewhere_take_the_lock_once_per_poll(
    refusing: type[RefusingProducer], monkeypatch: pytest.MonkeyPatch
) -> None:
    access = AccessRefusals()
    calls: list[tuple[str, str]] = []
    allowed = access.allowed

    def counted(kind: str, name: str, permission: str = "Read") -> Any:
        calls.append((name, permission))
        return allowed(kind, name, permission)

    monkeypatch.setattr(access, "allowed", counted)
    access.refused("topic", "acks", "Write", "TOPIC_AUTHORIZATION_FAILED")
    pub = Publisher({}, access=access)
    producer = cast(RefusingProducer, refusing.last)
    producer.refused.add("acks")
    ticket = Ticket()
    try:
        with producer._lock:  # queued together: delivered in one poll
            for i in range(200):
                producer._queue.append(
                    (FakeMessage("preds", None, b"%d" % i), pub._callback(ticket))
                )
            ticket._expect(200)
        assert settled(ticket, 2.0)
        assert calls == [("preds", "Write")], calls
    finally:
        pub.close(timeout_s=0.5)


def test_the_producer_refreshes_topic_metadata_as_often_as_the_consumers() -> None:
    """librdkafka keeps a topic that refused Write errored until its metadata is refreshed:
    with its 300 s default, a granted ACL would take up to 5 min to work."""
    from stream_infer.io.clients import producer_config
    from stream_infer.settings import parse_topology
    from tests.unit.test_settings import minimal

    topo = parse_topology(minimal(kafka={"metadata_refresh_ms": 7000}), env={})
    assert producer_config(topo.kafka)["topic.metadata.refresh.interval.ms"] == 7000
