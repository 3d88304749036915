"""The bench's events: ``stream_infer.local.loadgen.synthetic_events``, cheap to send at a rate.

Making an event with ``synthetic_events`` costs several microseconds of Python (a dataset row
to a dict, orjson, a random key), which at tens of thousands of events per second is CPU that
the system under test needs on a small machine. So the pool is made once, and the load
generator cycles through it, writing only a fresh ``id`` (``evt-<seed>-<n>``, one seed per
phase) and ``ts`` (now) into each event as it sends it. The events are the same JSON, field
for field and byte for byte in size, as ``synthetic_events`` makes.
"""

from __future__ import annotations

import base64
import itertools
import random
import time
from collections.abc import Iterator

import orjson

from stream_infer.local.loadgen import synthetic_events
from stream_infer.settings import Topology


class EventPool:
    """Feature rows and keys of ``synthetic_events``, re-stamped on the way out."""

    def __init__(
        self, topology: Topology, size: int = 20_000, seed: int = 0, padding: int = 0
    ) -> None:
        """``padding``: the length of an extra top-level string field ``"context"`` in each
        event (random base64 text), which the worker's decoder parses and ignores, as it
        does any field it does not know: a bigger event with the same features."""
        self.features = topology.features
        self.padding = padding
        rng = random.Random(seed)
        self._rows: list[tuple[bytes, bytes]] = []
        for key, value in itertools.islice(synthetic_events(topology, seed), size):
            doc = orjson.loads(value)
            body = orjson.dumps(doc["features"])
            if padding:
                text = base64.b64encode(rng.randbytes(padding))[:padding]
                body += b',"context":"%b"' % text
            self._rows.append((key, body))

    def mean_event_bytes(self, sample: int = 2_000) -> float:
        """The mean size of a stamped event's value (JSON bytes), over the first ``sample``."""
        values = [len(v) for _k, v in itertools.islice(self.stamped(1), sample)]
        return sum(values) / max(1, len(values))

    def stamped(self, seed: int) -> Iterator[tuple[bytes, bytes]]:
        """Endless (key, value) events with ids ``evt-<seed>-<n>`` and ``ts`` = now."""
        clock = time.time
        # ``features`` is the features' JSON, and the padding field after it if any.
        for n, (key, features) in enumerate(itertools.cycle(self._rows)):
            yield key, b'{"id":"evt-%d-%d","features":%b,"ts":%r}' % (seed, n, features, clock())


_POOLS: dict[tuple[tuple[str, ...], int], EventPool] = {}


def pool_for(topology: Topology, padding: int = 0, max_bytes: int = 64 << 20) -> EventPool:
    """One pool per feature list and padding, made on first use and kept (making one costs
    seconds). Big events make a smaller pool (at most ``max_bytes`` of JSON, at least 2,000
    events): the pool is cycled, so its size only bounds how often a row repeats."""
    key = (topology.features, padding)
    pool = _POOLS.get(key)
    if pool is None:
        per_event = 30 * len(topology.features) + 40 + padding  # ~bytes of one event
        size = max(2_000, min(20_000, max_bytes // per_event))
        pool = _POOLS[key] = EventPool(topology, size=size, padding=padding)
    return pool


def events_for(shared: EventPool, topology: Topology, padding: int = 0) -> EventPool:
    """The pool a run cycles: ``shared`` (the bench's, of the shipped topology) when the
    run's features are its and there is no padding, else :func:`pool_for`'s."""
    if topology.features == shared.features and padding == shared.padding:
        return shared
    return pool_for(topology, padding)
