"""/healthz: 500 only for what a restart mends (a dead thread, a publisher that cannot
deliver); a missing ACL is a warning at 200, so a liveness probe does not restart the pod in a
loop over it. And an unacknowledgeable control command does not hold up the next one."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import cast

import pytest

from stream_infer.io import publisher as publisher_module
from stream_infer.io.control_log import ControlLog
from stream_infer.io.publisher import Publisher
from stream_infer.runtime.worker import InferenceRuntime
from stream_infer.settings import parse_topology
from tests.unit.test_access import RefusingProducer
from tests.unit.test_publisher import FakeProducer, _wait_for
from tests.unit.test_settings import minimal

REFUSED = "TOPIC_AUTHORIZATION_FAILED"


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[InferenceRuntime]:
    monkeypatch.setattr(publisher_module, "Producer", RefusingProducer)
    topics = {"input": "in", "predictions": "out", "dead_letter": "dlq", "control": "ctl"}
    rt = InferenceRuntime(parse_topology(minimal(topics=topics | {"acks": "acks"}), env={}))
    rt.kafka.publisher = Publisher(
        {}, retry_backoff_s=0.01, refused_backoff_s=0.05, access=rt.kafka.access
    )
    yield rt
    rt.kafka.publisher.close(timeout_s=0.5)
    rt.threads.inference.shutdown(wait=False)
    rt.threads.loader.shutdown(wait=False)
    FakeProducer.last = None


def _gauge(rt: InferenceRuntime, name: str) -> float | None:
    return rt.metrics.registry.get_sample_value(name)


def test_a_missing_acl_is_a_warning_at_200_and_counted_for_alerting(
    runtime: InferenceRuntime,
) -> None:
    runtime.kafka.access.refused("topic", "acks", "Write", REFUSED)
    runtime.kafka.access.refused("topic", "in", "Read", REFUSED)
    status, body = runtime.health()
    assert status == 200 and body["ok"] is True and body["problems"] == [], body
    assert [w.split(" for ")[0] for w in body["warnings"]] == [
        f"Kafka has refused this worker's principal Write on topic 'acks' ({REFUSED})",
        f"Kafka has refused this worker's principal Read on topic 'in' ({REFUSED})",
    ]
    assert _gauge(runtime, "stream_infer_kafka_access_refused") == 2.0
    runtime.kafka.access.allowed("topic", "in")
    runtime.kafka.access.allowed("topic", "acks", "Write")
    assert runtime.health() == (200, {"ok": True, "problems": [], "oldest_unacked_s": 0.0})
    assert _gauge(runtime, "stream_infer_kafka_access_refused") == 0.0


def test_a_publisher_whose_poll_thread_died_fails_the_health_check(
    runtime: InferenceRuntime,
) -> None:
    assert runtime.kafka.publisher is not None
    runtime.kafka.publisher._failure = "the publisher's poll thread died: RuntimeError('x')"
    status, body = runtime.health()
    assert status == 500 and body["ok"] is False
    assert body["problems"] == ["the publisher's poll thread died: RuntimeError('x')"]


def test_a_control_log_thread_that_died_fails_the_health_check(
    runtime: InferenceRuntime,
) -> None:
    log = cast(ControlLog, object.__new__(ControlLog))
    log._thread = threading.Thread(target=lambda: None)
    log._thread.start()
    log._thread.join()
    log.error = RuntimeError("consumer fatal")
    runtime.kafka.control_log = log
    assert runtime.health()[0] == 200  # not started yet (or stopping): nothing to run
    runtime.ready = True
    status, body = runtime.health()
    assert status == 500 and body["problems"] == [
        "the control-log thread stopped (RuntimeError('consumer fatal')): "
        "later control commands are not applied"
    ]


def test_commands_apply_one_after_another_while_the_acks_topic_refuses_write(
    runtime: InferenceRuntime,
) -> None:
    assert runtime.kafka.publisher is not None
    producer = cast(RefusingProducer, RefusingProducer.last)
    producer.refused.add("acks")

    async def two_commands() -> None:
        for raw in (b"{}", b"not json"):  # each is rejected, and acknowledged as such
            await asyncio.wait_for(runtime.control.handle(raw), timeout=2.0)

    asyncio.run(two_commands())
    _wait_for(lambda: runtime.kafka.access.active, 2.0)  # refused at delivery
    assert runtime.health()[0] == 200
    producer.refused.clear()  # granted: both acks go out, in order
    _wait_for(lambda: sum(producer.acked.values()) == 2, 2.0)
    assert len(runtime.kafka.publisher) == 0


def test_the_models_threads_run_torch_with_the_topologys_thread_count(
    runtime: InferenceRuntime,
) -> None:
    """torch's intra-op thread count is per thread: the model-call thread and the inference
    thread must have the topology's, whatever another thread set (issue 16: a spinning
    OpenMP worker took a third of a core when they did not)."""
    import torch

    from stream_infer.core.events import ModelVersion

    wanted = runtime.topology.worker.inference_threads
    before = torch.get_num_threads()
    torch.set_num_threads(wanted + 1)  # this thread: what a new thread would inherit
    try:
        on_model_thread = runtime.models.watchdog.call(
            ModelVersion("m", "v"), torch.get_num_threads
        )
        on_inference = runtime.threads.inference.submit(torch.get_num_threads).result(10)
    finally:
        torch.set_num_threads(before)
    assert (on_model_thread, on_inference) == (wanted, wanted)
