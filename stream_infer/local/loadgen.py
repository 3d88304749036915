"""Synthetic feature events and an open-loop producer (fixed offered rate).

Open loop: event ``i`` is due at ``start + i / rate`` whatever the system under test does, so
queueing shows up as latency instead of silently slowing the producer down.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Producer

from stream_infer.examples import phishing
from stream_infer.settings import Topology

BAD_PAYLOADS: tuple[bytes, ...] = (
    b"not json at all",
    b"\xff\xfe\x00binary junk",
    b'{"id": 42, "features": []}',
    b'{"id": "bad-1"}',
    b'{"id": "bad-2", "features": {"x": "a string"}}',
    b"[1, 2, 3]",
)


def synthetic_events(topology: Topology, seed: int | None = 0) -> Iterator[tuple[bytes, bytes]]:
    """Endless (key, value) pairs of valid events for the topology.

    For the phishing topology the rows come from River's Phishing dataset; for any other
    feature list, from a seeded standard normal. Ids are ``evt-<run>-<n>``: the run is the
    seed, so a seeded run repeats itself; without a seed (None) it is random, and the rows'
    order too, so runs never reuse each other's ids.
    """
    run = str(seed) if seed is not None else uuid.uuid4().hex[:12]
    data_seed = seed if seed is not None else random.SystemRandom().randrange(1 << 31)
    features = topology.features
    if features == phishing.FEATURES:
        rows: Iterable[dict[str, float]] = (feats for _, feats, _ in phishing.events(data_seed))
    else:
        rng = random.Random(data_seed)
        rows = ({name: rng.gauss(0.0, 1.0) for name in features} for _ in itertools.count())
    keys = random.Random(data_seed + 1)
    for n, feats in enumerate(rows):
        key = f"entity-{keys.randrange(100_000)}".encode()
        yield key, orjson.dumps({"id": f"evt-{run}-{n}", "features": feats, "ts": time.time()})


def jsonl_events(path: Path) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) pairs from a JSON-lines file; the key is the event's "key" or its "id"."""
    with path.open("rb") as fh:
        for raw in fh:
            line = raw.strip()
            if not line:
                continue
            try:
                doc: Any = orjson.loads(line)
            except orjson.JSONDecodeError:
                yield b"", line  # sent as is: the worker will dead-letter it, as it should
                continue
            key = doc.get("key") or doc.get("id") if isinstance(doc, dict) else None
            yield (str(key).encode() if key else b""), line


def with_bad_events(
    events: Iterator[tuple[bytes, bytes]], fraction: float, seed: int = 0
) -> Iterator[tuple[bytes, bytes]]:
    """Mix malformed payloads into a stream (for demos and tests of the dead-letter path)."""
    rng = random.Random(seed)
    for item in events:
        if fraction > 0 and rng.random() < fraction:
            yield b"bad", rng.choice(BAD_PAYLOADS)
        yield item


def close_producer(producer: Producer, timeout_s: float = 10.0) -> None:
    """Deliver what is queued, then disconnect now rather than when the producer is garbage
    collected: one still connected when the broker stops (the demo's) logs librdkafka's
    ``FAIL ... Disconnected`` lines."""
    producer.flush(timeout_s)
    close = getattr(producer, "close", None)  # not in every confluent-kafka 2.x
    if close is not None:
        close()


class OpenLoopProducer:
    """Produces events at a fixed rate in a background thread until stopped or exhausted."""

    def __init__(
        self,
        conf: dict[str, Any],
        topic: str,
        events: Iterator[tuple[bytes, bytes]],
        *,
        rate: float,
        count: int | None = None,
        tick_s: float = 0.005,
        linger_ms: float = 5.0,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        if rate <= 0:
            msg = f"rate must be > 0 events/s, got {rate}"
            raise ValueError(msg)
        self.topic = topic
        self.rate = rate
        self.count = count
        self.tick_s = tick_s
        self.sent = 0
        self.errors = 0
        self._events = events
        self._on_error = on_error
        self._producer = Producer(conf | {"linger.ms": linger_ms, "acks": "all"})
        self._closed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="open-loop-producer", daemon=True)

    def start(self) -> OpenLoopProducer:
        self._thread.start()
        return self

    def _delivered(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self.errors += 1
            if self._on_error:
                self._on_error(str(err))

    def _run(self) -> None:
        start = time.monotonic()
        produce, poll = self._producer.produce, self._producer.poll
        while not self._stop.is_set():
            due = int((time.monotonic() - start) * self.rate)
            if self.count is not None:
                due = min(due, self.count)
            while self.sent < due:
                item = next(self._events, None)
                if item is None:
                    self._stop.set()
                    break
                key, value = item
                try:
                    produce(self.topic, value, key or None, on_delivery=self._delivered)
                except BufferError:
                    poll(0.01)
                    continue
                self.sent += 1
            poll(0)
            if self.count is not None and self.sent >= self.count:
                break
            time.sleep(self.tick_s)
        self._producer.flush(30)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop producing, deliver what is queued (the thread flushes), disconnect."""
        self._stop.set()
        self._thread.join(timeout_s)
        if not self._thread.is_alive() and not self._closed:
            self._closed = True  # stop() may be called again
            close_producer(self._producer)

    def join(self, timeout_s: float | None = None) -> None:
        self._thread.join(timeout_s)
