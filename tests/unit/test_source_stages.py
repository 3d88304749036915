"""BatchSource's latency stages, without a broker: the fetch delay (now minus the oldest record
timestamp of each fetched chunk) and each batch's opened_at (its first record's arrival)."""

from __future__ import annotations

import time
from typing import Any

from confluent_kafka import Message

from stream_infer.io.source import BatchSource, SourceBatch


class _Consumer:
    """Hands out prepared chunks, one per consume() call, then nothing."""

    def __init__(self, chunks: list[list[Message]]) -> None:
        self.chunks = chunks

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]:
        return self.chunks.pop(0) if self.chunks else []

    def __getattr__(self, name: str) -> Any:  # store_offsets & co: not reached here
        raise AssertionError(f"unexpected consumer call {name}")


def _record(offset: int, age_s: float | None) -> Message:
    ts = (1, int((time.time() - age_s) * 1000)) if age_s is not None else (0, -1)
    return Message(topic="in", partition=offset % 2, offset=offset, timestamp=ts, value=b"{}")


def _source(handed: list[SourceBatch], delays: list[float], wait_ms: float) -> BatchSource:
    source = BatchSource(
        {},
        ["in"],
        max_batch_size=3,
        max_wait_ms=wait_ms,
        max_in_flight=10,
        hand_off=handed.append,
        on_fetch_delay=delays.append,
    )
    source._lag_due = float("inf")  # no watermark queries
    return source


def test_the_fetch_delay_is_the_oldest_record_of_each_chunk() -> None:
    handed: list[SourceBatch] = []
    delays: list[float] = []
    source = _source(handed, delays, wait_ms=10_000)
    consumer: Any = _Consumer(
        [[_record(0, 0.020), _record(1, 0.250), _record(2, 0.100)], [_record(3, None)]]
    )
    source._step(consumer)
    source._step(consumer)  # a chunk without timestamps reports nothing
    assert len(delays) == 1
    assert 0.250 <= delays[0] < 0.250 + 0.001 + 0.2  # whole-ms stamps add up to 1 ms
    assert [len(b.records) for b in handed] == [3]


def test_a_batch_opens_when_its_first_record_arrives() -> None:
    handed: list[SourceBatch] = []
    source = _source(handed, [], wait_ms=50)
    consumer: Any = _Consumer(
        [[_record(0, 0.0), _record(1, 0.0)], [_record(2, 0.0), _record(3, 0.0)]]
    )
    source._step(consumer)  # two records: the batch is open
    between = time.monotonic()
    source._step(consumer)  # the third fills it; the fourth opens the next one
    assert len(handed) == 1
    first = handed[0]
    assert first.opened_at is not None and first.opened_at < between <= first.closed_at
    time.sleep(0.06)
    source._step(consumer)  # nothing new; the open batch's 50 ms are over
    assert [len(b.records) for b in handed] == [3, 1]
    second = handed[1]
    assert second.opened_at is not None and between < second.opened_at
    assert second.closed_at - second.opened_at >= 0.05  # waited its max_wait in the batcher
