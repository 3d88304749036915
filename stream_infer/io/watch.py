"""Watching output topics: predictions, dead letters and shadows, with running statistics.

Used by ``stream-infer tail`` and the demo. A group-less consumer (assigned partitions, no
group) so it never joins or disturbs a consumer group.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer

from stream_infer.errors import BrokerError
from stream_infer.io.clients import assign_partitions, consume_ready, groupless_consumer_config
from stream_infer.settings import KafkaSettings


def assign_all(
    consumer: Consumer,
    topics: list[str],
    *,
    from_beginning: bool,
    timeout_s: float | None = 10.0,
    on_missing: Callable[[list[str]], None] | None = None,
) -> None:
    """Assign every partition of the topics, from the beginning or from the end.

    Waits up to ``timeout_s`` (None: for as long as it takes) for each topic to appear in the
    metadata with a leader on every partition (a topic created a moment ago may not be there
    yet); then a topic still missing is an error naming it, never a silent gap in what is
    read. ``on_missing`` is told once, with the topics missing at the first look, that it
    waits for them."""
    start = OFFSET_BEGINNING if from_beginning else OFFSET_END
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    told = False
    while True:
        left = 10.0 if deadline is None else max(0.1, deadline - time.monotonic())
        meta = consumer.list_topics(timeout=left)
        missing = [
            t
            for t in topics
            if t not in meta.topics
            or meta.topics[t].error is not None
            or not meta.topics[t].partitions
            or any(p.leader < 0 for p in meta.topics[t].partitions.values())
        ]
        if not missing:
            break
        if deadline is not None and time.monotonic() >= deadline:
            msg = f"topics {missing} have no partitions with a leader after {timeout_s:g} s"
            raise BrokerError(msg)
        if on_missing is not None and not told:
            absent = [t for t in missing if t not in meta.topics]
            if absent:
                on_missing(absent)
                told = True
        time.sleep(0.1 if deadline is not None else 0.5)
    assign_partitions(consumer, {t: meta.topics[t].partitions for t in topics}, start)


def collect_acks(
    consumer: Consumer,
    command_id: str | None,
    *,
    wait_s: float,
    workers: int | None = None,
    on_ack: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """The answers to one command (to every command, when ``command_id`` is None) on an
    assigned acks consumer: until ``workers`` distinct workers answered, or ``wait_s`` passed.
    A record that is not an ack (not a JSON object) is skipped."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        for msg in consume_ready(consumer, 500, min(0.5, max(0.01, deadline - time.monotonic()))):
            if msg.error() is not None:
                continue
            try:
                ack = orjson.loads(msg.value() or b"")
            except orjson.JSONDecodeError:
                continue
            if not isinstance(ack, dict):
                continue
            if command_id is not None and ack.get("command_id") != command_id:
                continue
            out.append(ack)
            if on_ack is not None:
                on_ack(ack)
        if workers is not None and len({a.get("worker") for a in out}) >= workers:
            break
    return out


class OutputWatcher:
    """Consumes output topics in a thread and keeps counts and a latency window."""

    def __init__(
        self,
        kafka: KafkaSettings,
        *,
        prediction_topics: list[str],
        dead_letter_topic: str | None,
        from_beginning: bool = True,
        window_s: float = 5.0,
        on_record: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        conf = groupless_consumer_config(kafka.librdkafka(), "watch")
        self._consumer = Consumer(conf | {"fetch.wait.max.ms": kafka.fetch_wait_max_ms})
        self.prediction_topics = prediction_topics
        self.dead_letter_topic = dead_letter_topic
        self.from_beginning = from_beginning
        self.window_s = window_s
        self._on_record = on_record
        self.predictions = 0
        self.by_version: Counter[str] = Counter()
        self.dead_letters: Counter[str] = Counter()
        self.ids: set[str] = set()
        self.duplicates = 0
        self._recent: deque[tuple[float, float]] = deque()  # (received at, latency s)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="output-watcher", daemon=True)

    def start(self) -> OutputWatcher:
        topics = [*self.prediction_topics]
        if self.dead_letter_topic:
            topics.append(self.dead_letter_topic)
        assign_all(self._consumer, topics, from_beginning=self.from_beginning)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._consumer.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            for msg in consume_ready(self._consumer, 1000, 0.1):
                if msg.error():
                    continue
                now = time.time()
                try:
                    doc = orjson.loads(msg.value() or b"")
                except orjson.JSONDecodeError:
                    continue
                topic = msg.topic()
                with self._lock:
                    if topic == self.dead_letter_topic:
                        self.dead_letters[str(doc.get("error"))] += 1
                    else:
                        self._count_prediction(doc, now)
                if self._on_record:
                    self._on_record(str(topic), doc)

    def _count_prediction(self, doc: dict[str, Any], now: float) -> None:
        self.predictions += 1
        self.by_version[f"{doc.get('model')}:{doc.get('version')}"] += 1
        event_id = doc.get("id")
        if event_id in self.ids:
            self.duplicates += 1
        else:
            self.ids.add(str(event_id))
        ts = doc.get("ts")
        if isinstance(ts, (int, float)):
            self._recent.append((now, now - ts))
        while self._recent and self._recent[0][0] < now - self.window_s:
            self._recent.popleft()

    def snapshot(self) -> dict[str, Any]:
        """Totals, the rate and latency percentiles over the last window."""
        with self._lock:
            now = time.time()
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()
            lat = np.array([latency for _, latency in self._recent])
            return {
                "predictions": self.predictions,
                "unique_ids": len(self.ids),
                "duplicates": self.duplicates,
                "by_version": dict(self.by_version),
                "dead_letters": dict(self.dead_letters),
                "rate": len(lat) / self.window_s,
                "p50_ms": float(np.percentile(lat, 50) * 1000) if lat.size else None,
                "p99_ms": float(np.percentile(lat, 99) * 1000) if lat.size else None,
            }
