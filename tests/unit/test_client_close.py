"""The demo's clients disconnect when stopped, before the broker stops (hardening item 17):
the demo ended by printing librdkafka's ``FAIL ... Disconnected`` lines, because its load
producer and labeler stayed connected until garbage collected, after the broker was gone."""

from __future__ import annotations

from typing import Any

import pytest

from stream_infer.local import demo, loadgen


class _Producer:
    made: list[_Producer] = []  # noqa: RUF012 (a test fake's registry)

    def __init__(self, conf: dict[str, Any]) -> None:
        self.calls: list[str] = []
        _Producer.made.append(self)

    def produce(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append("produce")

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float = -1) -> int:
        self.calls.append("flush")
        return 0

    def close(self) -> bool:
        self.calls.append("close")
        return True


@pytest.fixture
def producers(monkeypatch: pytest.MonkeyPatch) -> list[_Producer]:
    _Producer.made = []
    monkeypatch.setattr(loadgen, "Producer", _Producer)
    monkeypatch.setattr(demo, "Producer", _Producer)
    return _Producer.made


def test_the_load_producer_flushes_and_disconnects_when_stopped(
    producers: list[_Producer],
) -> None:
    load = loadgen.OpenLoopProducer(
        {}, "in", iter([(b"k", b"v")] * 3), rate=1000.0, count=3
    ).start()
    load.join(2.0)
    load.stop()
    load.stop()  # again: nothing more (a closed producer raises on flush)
    (producer,) = producers
    assert producer.calls[-2:] == ["flush", "close"]
    assert producer.calls.count("close") == 1


def test_the_labeler_flushes_and_disconnects_when_stopped(producers: list[_Producer]) -> None:
    labeler = demo.Labeler({}, "labels", delay_s=0.0, flip_at=None)
    labeler.stop()
    (producer,) = producers
    assert producer.calls[-1] == "close" and "flush" in producer.calls


def test_a_client_without_close_is_flushed(producers: list[_Producer]) -> None:
    class Old(_Producer):
        close = None  # type: ignore[assignment]  # older confluent-kafka: no Producer.close

    old = Old({})
    loadgen.close_producer(old)  # type: ignore[arg-type]
    assert old.calls == ["flush"]
