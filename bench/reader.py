"""The separate reader: reads a system's prediction topic and timestamps every prediction.

A group-less confluent-kafka consumer (partitions assigned, no group to join or disturb) in a
thread, reading committed records only (``isolation.level=read_committed``, pinned: the outputs
of exactly_once are read as its consumers must read them). Each prediction carries the event's
``id`` and ``ts`` (set when the load generator made the event); the reader stamps it with
``time.time()`` when it arrives. Latency is arrival minus ``ts``: producer, broker, system,
broker again, and the reader, end to end. The prediction record's own timestamp (set by the
system's producer as it produces it) is kept too: arrival minus it is the last hop (system's
producer, broker, reader), per event.

Events of different phases carry different seeds, and synthetic ids are ``evt-{seed}-{n}``, so
each prediction is counted in its phase without any coordination with the system.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from array import array
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import orjson
from confluent_kafka import Consumer, Message

from stream_infer.io.clients import groupless_consumer_config
from stream_infer.io.watch import assign_all

# librdkafka's own lines through Python logging (info, such as tansu closing idle
# connections, stays quiet; errors show).
RDKAFKA_LOG = logging.getLogger("bench.librdkafka")


@dataclass
class PhaseStats:
    """What arrived for one phase (one seed)."""

    ids: set[str] = field(default_factory=set)
    duplicates: int = 0
    first_recv: float | None = None
    last_recv: float | None = None
    ts: array[float] = field(default_factory=lambda: array("d"))
    recv: array[float] = field(default_factory=lambda: array("d"))
    created: array[float] = field(default_factory=lambda: array("d"))  # NaN: no timestamp

    @property
    def unique(self) -> int:
        return len(self.ids)

    def latencies_s(self, *, min_ts: float = 0.0) -> npt.NDArray[np.float64]:
        """Arrival minus ``ts`` for events generated at or after ``min_ts`` (first arrival)."""
        ts = np.frombuffer(self.ts, dtype=np.float64)
        recv = np.frombuffer(self.recv, dtype=np.float64)
        keep = ts >= min_ts
        return np.asarray(recv[keep] - ts[keep], dtype=np.float64)

    def out_hop_s(self, *, min_ts: float = 0.0) -> npt.NDArray[np.float64]:
        """Arrival minus the prediction record's timestamp, for events generated at or after
        ``min_ts`` (records without a timestamp left out)."""
        ts = np.frombuffer(self.ts, dtype=np.float64)
        recv = np.frombuffer(self.recv, dtype=np.float64)
        created = np.frombuffer(self.created, dtype=np.float64)
        keep = (ts >= min_ts) & ~np.isnan(created)
        return np.asarray(recv[keep] - created[keep], dtype=np.float64)


def reader_config(bootstrap_servers: str) -> dict[str, object]:
    """The reader's consumer: group-less, ``fetch.wait.max.ms`` 5, and
    ``isolation.level=read_committed`` for every system (librdkafka's default, pinned here:
    under exactly_once a prediction counts, and its latency ends, only once its batch's
    transaction committed; an aborted attempt's records are never read)."""
    conf = {
        "bootstrap.servers": bootstrap_servers,
        "enable.partition.eof": False,
        "fetch.wait.max.ms": 5,
        "client.id": "bench-reader",
        "logger": RDKAFKA_LOG,
    }
    return groupless_consumer_config(conf, "bench-reader") | {"isolation.level": "read_committed"}


class PredictionReader:
    """Reads prediction topics from the beginning and keeps per-phase arrival statistics."""

    def __init__(self, bootstrap_servers: str, topics: list[str]) -> None:
        self._consumer = Consumer(reader_config(bootstrap_servers))
        self.topics = topics
        self.errors = 0
        self.undecodable = 0
        self._phases: dict[str, PhaseStats] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prediction-reader", daemon=True)

    def start(self) -> PredictionReader:
        self._wait_for_leaders()
        assign_all(self._consumer, self.topics, from_beginning=True)
        self._thread.start()
        return self

    def _wait_for_leaders(self, timeout_s: float = 30.0) -> None:
        """Wait until the broker's metadata has every partition of the topics, with a leader.

        Apache Kafka (KRaft) answers CreateTopics once the controller has the topic; the broker
        that answers metadata may learn of it a moment later, and a topic missing from the
        metadata would not be assigned at all (seen: a floor run that read nothing)."""
        deadline = time.monotonic() + timeout_s
        missing = list(self.topics)
        while True:
            meta = self._consumer.list_topics(timeout=5.0).topics
            missing = [
                t
                for t in self.topics
                if t not in meta
                or meta[t].error is not None
                or not meta[t].partitions
                or any(p.leader < 0 for p in meta[t].partitions.values())
            ]
            if not missing:
                return
            if time.monotonic() > deadline:
                msg = f"reader: no leader for every partition of {missing} after {timeout_s:g} s"
                raise RuntimeError(msg)
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._consumer.close()

    def phase(self, seed: int) -> PhaseStats:
        with self._lock:
            return self._phases.setdefault(str(seed), PhaseStats())

    def count(self, seed: int) -> int:
        with self._lock:
            stats = self._phases.get(str(seed))
            return stats.unique if stats else 0

    def _run(self) -> None:
        consumer = self._consumer
        while not self._stop.is_set():
            # consume(n, timeout) waits for n records or the timeout, whichever first, which
            # would delay arrival stamps: take what is there, else block for one record only.
            msgs = consumer.consume(10_000, 0)
            if not msgs:
                one = consumer.poll(0.02)
                if one is None:
                    continue
                msgs = [one]
            now = time.time()
            self._record(msgs, now)

    def _record(self, msgs: list[Message], now: float) -> None:
        loads = orjson.loads
        with self._lock:
            for msg in msgs:
                if msg.error() is not None:
                    self.errors += 1
                    continue
                try:
                    doc = loads(msg.value() or b"")
                    event_id = doc["id"]
                    ts = float(doc["ts"])
                    seed = event_id.split("-", 2)[1]
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, IndexError):
                    self.undecodable += 1
                    continue
                stats = self._phases.get(seed)
                if stats is None:
                    stats = self._phases[seed] = PhaseStats()
                if event_id in stats.ids:
                    stats.duplicates += 1
                    continue
                stats.ids.add(event_id)
                if stats.first_recv is None:
                    stats.first_recv = now
                stats.last_recv = now
                stats.ts.append(ts)
                stats.recv.append(now)
                created_ms = msg.timestamp()[1]
                stats.created.append(created_ms / 1000.0 if created_ms > 0 else math.nan)
