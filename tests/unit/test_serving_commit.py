"""The runtime's per-batch, commit and stop paths, without a broker or faust.

- a batch that raises fails in the checkpoint; later batches (an agent restarted by faust
  during the shutdown) are skipped; a batch whose record cannot be delivered fails too
  (hardening item 1);
- /healthz reports the age of the oldest unacknowledged batch, and a problem past
  limits.max_unacked_s; a record refused for good becomes a dead letter (item 10);
- stopping: each step runs whatever an earlier one raised, one deadline for the drain, and an
  ack is not produced on the event loop (item 17).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Message
from jsonschema import Draft202012Validator

from stream_infer.core.events import BatchResult, OutRecord
from stream_infer.errors import DeliveryError
from stream_infer.io import publisher as publisher_module
from stream_infer.io.publisher import Publisher, Ticket
from stream_infer.io.source import BatchSource, SourceBatch
from stream_infer.runtime.worker import InferenceRuntime
from stream_infer.settings import parse_topology
from tests.tickets import settled
from tests.unit.conftest import FakeRecord
from tests.unit.test_publisher import FakeProducer
from tests.unit.test_settings import minimal

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[InferenceRuntime]:
    monkeypatch.setattr(publisher_module, "Producer", FakeProducer)
    topics = {"input": "in", "predictions": "out", "dead_letter": "dlq", "control": "ctl"}
    rt = InferenceRuntime(
        parse_topology(
            minimal(
                topics=topics | {"acks": "acks"},
                limits={"max_unacked_s": 0.2, "unreachable_grace_s": 0.1},
            ),
            env={},
        )
    )
    rt.kafka.publisher = Publisher({}, retry_backoff_s=0.01, undeliverable=rt.kafka.undeliverable)
    rt.kafka.source = BatchSource(
        {}, ["in"], max_batch_size=1, max_wait_ms=1, max_in_flight=8, hand_off=lambda _: None
    )
    yield rt
    rt.kafka.publisher.close(timeout_s=0.2)
    rt.threads.inference.shutdown(wait=False)
    rt.threads.loader.shutdown(wait=False)
    FakeProducer.last = None


def _handed(source: BatchSource, n: int) -> list[SourceBatch]:
    """n batches handed out by the source (one record each, offsets 0..n-1)."""
    handed: list[SourceBatch] = []
    source._hand_off = handed.append
    for offset in range(n):
        source._send([Message(topic="in", partition=0, offset=offset, value=b"{}")])
    return handed


def test_a_batch_that_raises_fails_and_later_batches_are_skipped(
    runtime: InferenceRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """faust restarts the agent after app.crash; it went on taking batches during the
    shutdown, served them and marked them done, and close committed past the failed one."""
    assert runtime.kafka.source is not None
    b0, b1, b2 = _handed(runtime.kafka.source, 3)
    served: list[int] = []

    def process(batch: SourceBatch, ticket: Ticket) -> BatchResult:
        if batch is b1:
            raise RuntimeError("publish raised")
        served.append(batch.seq)
        ticket._expect(0)
        return BatchResult()

    monkeypatch.setattr(runtime.batches.inference, "process", process)

    async def scenario() -> None:
        await runtime.batches.handle(b0)
        with pytest.raises(RuntimeError, match="publish raised"):
            await runtime.batches.handle(b1)
        await runtime.batches.handle(b2)  # the restarted agent: skipped

    asyncio.run(scenario())
    assert served == [0]
    assert runtime.kafka.source.checkpoint.failed_at == 1
    assert len(runtime.batches.commits) == 1  # b0 only
    status, body = runtime.health()
    assert status == 500
    assert body["problems"] == [
        "a batch failed (cannot serve it: RuntimeError('publish raised')): nothing after it "
        "is committed; a restart serves it again"
    ]


def test_a_batch_whose_record_cannot_be_delivered_fails_and_stops_the_commits(
    runtime: InferenceRuntime,
) -> None:
    assert runtime.kafka.source is not None
    b0, b1, b2 = _handed(runtime.kafka.source, 3)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        tickets = [Ticket(loop) for _ in range(3)]
        for batch, ticket in zip((b0, b1, b2), tickets, strict=True):
            await runtime.batches.commits.add(batch, ticket)
        tickets[0]._expect(0)
        tickets[2]._expect(0)
        tickets[1]._fail(DeliveryError("refused for good", topic="dlq"))
        with pytest.raises(DeliveryError):
            await asyncio.wait_for(runtime.batches.commits.run(), 2.0)

    asyncio.run(scenario())
    checkpoint = runtime.kafka.source.checkpoint
    assert checkpoint.failed_at == 1
    assert checkpoint.release() == {("in", 0): 1}  # b0's; never b2's


def test_healthz_reports_the_oldest_unacknowledged_batch_and_a_problem_past_the_bound(
    runtime: InferenceRuntime,
) -> None:
    assert runtime.kafka.publisher is not None
    producer = FakeProducer.last
    assert producer is not None
    producer.failing = {b"p"}
    producer.down.set()
    ticket = Ticket()
    runtime.kafka.publisher.publish([OutRecord("out", b"k", b"p")], ticket)
    status, body = runtime.health()
    assert status == 200 and 0.0 <= body["oldest_unacked_s"] < 0.2
    time.sleep(0.3)
    status, body = runtime.health()
    assert status == 500 and body["oldest_unacked_s"] >= 0.3
    (problem,) = body["problems"]
    assert problem.startswith("the oldest batch not acknowledged by the broker has waited")
    assert "limits.max_unacked_s=0.2" in problem
    # A refused Read (a quiet control topic, once) says nothing of deliveries: still a stall.
    runtime.kafka.access.refused("topic", "ctl", "Read", "TOPIC_AUTHORIZATION_FAILED")
    assert runtime.health()[0] == 500
    # While Kafka refuses a Write the wait is its warning's, not a restart's business.
    runtime.kafka.access.refused("topic", "out", "Write", "TOPIC_AUTHORIZATION_FAILED")
    assert runtime.health()[0] == 200
    runtime.kafka.access.allowed("topic", "out", "Write")
    producer.down.clear()
    assert settled(ticket, 2.0)
    status, body = runtime.health()
    assert status == 200 and body["oldest_unacked_s"] == 0.0


def test_a_record_refused_for_good_becomes_a_valid_undeliverable_dead_letter(
    runtime: InferenceRuntime,
) -> None:
    record = OutRecord("out", b"key-1", b'{"id": "e-1", "prediction": 0.5}')
    letter = runtime.kafka.undeliverable(record, "topic 'out' refused it for good (INVALID_RECORD)")
    assert letter is not None and letter.topic == "dlq" and letter.key == b"key-1"
    doc = orjson.loads(letter.value)
    schema = orjson.loads((SCHEMAS / "dead-letter.schema.json").read_bytes())
    Draft202012Validator(schema).validate(doc)
    assert doc["error"] == "undeliverable" and doc["topic"] == "out"
    assert doc["partition"] is None and doc["offset"] is None
    assert orjson.loads(doc["raw"]) == {"id": "e-1", "prediction": 0.5}
    assert "INVALID_RECORD" in doc["detail"]
    # A prediction names the input record it was made from: where to replay it from.
    source = FakeRecord(b'{"id": "e-2"}', b"key-2", topic="in", partition=3, offset=41)
    made = OutRecord("out", b"key-2", b'{"id": "e-2", "prediction": 0.5}', source)
    ticket = Ticket()
    ticket.records = [record, made]
    found = ticket.find("out", b"key-2", b'{"id": "e-2", "prediction": 0.5}')
    assert found is made, "a delivery report's bytes find their record"
    letter = runtime.kafka.undeliverable(
        found, "topic 'out' refused it for good (MSG_SIZE_TOO_LARGE)"
    )
    assert letter is not None
    doc = orjson.loads(letter.value)
    Draft202012Validator(schema).validate(doc)
    assert (doc["topic"], doc["partition"], doc["offset"]) == ("in", 3, 41)
    # A dead letter refused for good has nowhere else to go.
    assert runtime.kafka.undeliverable(OutRecord("dlq", None, b"x"), "why") is None
    assert (
        runtime.metrics.registry.get_sample_value(
            "stream_infer_dead_letters_total", {"reason": "undeliverable"}
        )
        == 2.0
    )


class _Step:
    def __init__(self, *, fails: bool = False, takes_s: float = 0.0) -> None:
        self.fails, self.takes_s = fails, takes_s
        self.calls: list[float | None] = []

    def __call__(self, timeout_s: float | None = None) -> int:
        self.calls.append(timeout_s)
        time.sleep(self.takes_s)
        if self.fails:
            raise RuntimeError("cannot stop")
        return 0


def test_stop_runs_every_step_whatever_an_earlier_one_raised_within_one_deadline(
    runtime: InferenceRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """learning.stop() raising aborted rt.stop() before the publisher was closed: records
    still queued were never delivered (and the control log never closed)."""
    source_stop, learning_stop = _Step(takes_s=0.3), _Step(fails=True)
    publisher_close, control_close = _Step(), _Step(fails=True)
    assert runtime.kafka.source is not None and runtime.kafka.publisher is not None
    real_close = runtime.kafka.publisher.close
    monkeypatch.setattr(runtime.kafka.source, "stop", source_stop)
    monkeypatch.setattr(runtime.kafka.publisher, "close", publisher_close)
    runtime.learning = type("L", (), {"stop": learning_stop})()
    runtime.kafka.control_log = type("C", (), {"close": control_close})()
    asyncio.run(runtime.stop(timeout_s=2.0))
    assert len(learning_stop.calls) == len(publisher_close.calls) == len(control_close.calls) == 1
    (source_left,) = source_stop.calls
    (publisher_left,) = publisher_close.calls
    assert source_left is not None and 1.9 <= source_left <= 2.0
    # What the drain left of the one deadline (and at least a second for the last acks).
    assert publisher_left is not None and 1.0 <= publisher_left <= 1.75
    runtime.learning = None
    runtime.kafka.control_log = None
    real_close(timeout_s=0.2)


def test_an_ack_is_produced_off_the_event_loop(
    runtime: InferenceRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It was produced on the event loop, which slept on a full local queue (BufferError)."""
    assert runtime.kafka.publisher is not None
    threads: list[str] = []
    publish = runtime.kafka.publisher.publish

    def spy(records: Any, ticket: Ticket) -> None:
        threads.append(threading.current_thread().name)
        publish(records, ticket)

    monkeypatch.setattr(runtime.kafka.publisher, "publish", spy)

    async def one_command() -> str:
        await asyncio.wait_for(runtime.control.handle(b"not json"), timeout=2.0)
        return threading.current_thread().name

    loop_thread = asyncio.run(one_command())
    deadline = time.monotonic() + 2.0
    while not threads and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threads and threads[0] != loop_thread
    assert threads[0].startswith("model-loader")
