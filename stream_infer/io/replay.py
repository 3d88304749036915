"""Reading topics again over a past time range, without disturbing anyone: the backtest's input.

A :class:`Replay` finds, for every partition of the topics, the first offset whose record
timestamp is at or after ``from_ms`` (Kafka's offsets-for-times: ListOffsets by timestamp) and
the end: the first offset at or after ``until_ms``, or else the high watermark when the replay
begins, so records written while it runs are not read. It reads each partition from its start
to its end and stops.

It joins no consumer group: its consumer is assigned its partitions
(:func:`~stream_infer.io.clients.groupless_consumer_config`, a group id of its own that no
member ever joins) and commits nothing, so it can neither trigger a rebalance of the serving
group nor move that group's offsets, and the broker keeps no state for it. It reads committed
records only (``read_committed``). It produces nothing.

A partition is read to its end when the consumer's position reaches the end (a transaction
marker takes an offset and is never returned), when librdkafka reports the partition's end at
or past it, or when a record at or past the end arrives (it is not returned). A partition whose
committed records stop short of its end (an open transaction) is left after ``idle_timeout_s``
without a record and named in :attr:`Replay.incomplete`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from stream_infer.errors import BrokerError
from stream_infer.io.clients import RDKAFKA_LOG, consume_ready, groupless_consumer_config
from stream_infer.settings import KafkaSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartitionRange:
    """The offsets of one partition a replay reads: ``[start, end)``."""

    topic: str
    partition: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return max(0, self.end - self.start)


class Replay:
    """Every committed record of ``topics`` whose offset lies in the range of its partition
    that ``[from_ms, until_ms)`` selects by record timestamp (see the module docstring).

    ``until_ms`` None: up to the high watermark when :meth:`open` runs.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        topics: list[str],
        *,
        from_ms: int,
        until_ms: int | None = None,
        timeout_s: float = 15.0,
        idle_timeout_s: float = 10.0,
    ) -> None:
        if until_ms is not None and until_ms <= from_ms:
            msg = f"the replay's end ({until_ms} ms) must come after its start ({from_ms} ms)"
            raise ValueError(msg)
        self.topics = list(topics)
        self.from_ms = from_ms
        self.until_ms = until_ms
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
        conf: dict[str, Any] = groupless_consumer_config(
            kafka.librdkafka() | {"logger": RDKAFKA_LOG}, "backtest"
        ) | {
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
        }
        self.group_id = str(conf["group.id"])
        self._consumer = Consumer(conf | kafka.extra)
        self.ranges: list[PartitionRange] = []
        self.incomplete: list[PartitionRange] = []

    def __enter__(self) -> Replay:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def total(self) -> int:
        """The offsets to read, over every partition (records plus any transaction markers)."""
        return sum(r.size for r in self.ranges)

    def open(self) -> list[PartitionRange]:
        """Find every partition's range and assign the partitions that have one."""
        consumer, timeout = self._consumer, self.timeout_s
        meta = consumer.list_topics(timeout=timeout)
        parts: list[TopicPartition] = []
        for topic in self.topics:
            info = meta.topics.get(topic)
            if info is None or info.error is not None or not info.partitions:
                msg = f"topic {topic!r} does not exist (or has no partitions) on the cluster"
                raise BrokerError(msg)
            parts += [TopicPartition(topic, p) for p in sorted(info.partitions)]
        starts = self._offsets_for(parts, self.from_ms)
        ends = self._offsets_for(parts, self.until_ms) if self.until_ms is not None else None
        ranges = []
        for i, tp in enumerate(parts):
            low, high = consumer.get_watermark_offsets(tp, timeout=timeout)
            # Offsets-for-times answers -1 (OFFSET_END) when no record is at or after the time.
            start = starts[i] if starts[i] >= 0 else high
            end = high if ends is None or ends[i] < 0 else min(ends[i], high)
            ranges.append(PartitionRange(tp.topic, tp.partition, max(start, low), end))
        self.ranges = ranges
        todo = [r for r in ranges if r.size > 0]
        consumer.assign([TopicPartition(r.topic, r.partition, r.start) for r in todo])
        log.info(
            "replaying %d offsets of %d partitions of %s from %d ms%s",
            self.total,
            len(todo),
            ", ".join(self.topics),
            self.from_ms,
            f" until {self.until_ms} ms" if self.until_ms is not None else "",
        )
        return ranges

    def _offsets_for(self, parts: list[TopicPartition], ms: int) -> list[int]:
        query = [TopicPartition(tp.topic, tp.partition, ms) for tp in parts]
        try:
            found = self._consumer.offsets_for_times(query, timeout=self.timeout_s)
        except Exception as exc:  # KafkaException: the cluster did not answer in time
            msg = f"offsets for time {ms} ms of {self.topics}: {exc}"
            raise BrokerError(msg) from exc
        by_key = {(tp.topic, tp.partition): tp for tp in found}
        out = []
        for tp in parts:
            answer = by_key[(tp.topic, tp.partition)]
            if answer.error is not None:
                msg = f"offsets for time {ms} ms of {tp.topic}[{tp.partition}]: {answer.error}"
                raise BrokerError(msg)
            out.append(answer.offset)
        return out

    def batches(self, max_records: int = 1000) -> Iterator[list[Message]]:
        """The records, in batches of at most ``max_records``, until every partition is read to
        its end (or left after ``idle_timeout_s`` without a record). Call :meth:`open` first."""
        consumer = self._consumer
        ends = {(r.topic, r.partition): r.end for r in self.ranges if r.size > 0}
        idle_since = time.monotonic()
        while ends:
            out: list[Message] = []
            for msg in consume_ready(consumer, max_records, 0.5):
                error = msg.error()
                key = (msg.topic() or "", msg.partition() or 0)
                end = ends.get(key)
                if error is not None:
                    if error.code() != KafkaError._PARTITION_EOF:
                        if error.fatal() or not error.retriable():
                            msg_ = f"replaying {key[0]}[{key[1]}]: {error.str()}"
                            raise BrokerError(msg_)
                        log.warning("replaying %s[%d]: %s", key[0], key[1], error.str())
                    elif end is not None and (msg.offset() or 0) >= end:
                        del ends[key]
                    continue
                if end is None:
                    continue  # its partition is done: past the end
                if (msg.offset() or 0) >= end:
                    del ends[key]
                    continue
                out.append(msg)
                if (msg.offset() or 0) + 1 >= end:
                    del ends[key]
            if ends:
                done = [
                    k
                    for k, tp in zip(
                        list(ends),
                        consumer.position([TopicPartition(t, p) for t, p in ends]),
                        strict=True,
                    )
                    if tp.offset >= ends[k]
                ]
                for k in done:
                    del ends[k]
            if out:
                idle_since = time.monotonic()
                yield out
            elif ends and time.monotonic() - idle_since > self.idle_timeout_s:
                self.incomplete = [
                    r for r in self.ranges if (r.topic, r.partition) in ends and r.size > 0
                ]
                log.warning(
                    "replay: no record for %.0f s from %s; leaving them short of their end",
                    self.idle_timeout_s,
                    ", ".join(f"{t}[{p}]" for t, p in ends),
                )
                return

    def close(self) -> None:
        """Close the consumer: it leaves no group (it joined none) and commits nothing."""
        self._consumer.close()
