"""The bench's events: ``stream_infer.local.loadgen.synthetic_events``, cheap to send at a rate.

Making an event with ``synthetic_events`` costs several microseconds of Python (a dataset row
to a dict, orjson, a random key), which at tens of thousands of events per second is CPU that
the system under test needs on a small machine. So the pool is made once, and the load
generator cycles through it, writing only a fresh ``id`` (``evt-<seed>-<n>``, one seed per
phase) and ``ts`` (now) into each event as it sends it. The events are the same JSON, field
for field and byte for byte in size, as ``synthetic_events`` makes.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import orjson

from stream_infer.local.loadgen import synthetic_events
from stream_infer.settings import Topology


class EventPool:
    """Feature rows and keys of ``synthetic_events``, re-stamped on the way out."""

    def __init__(self, topology: Topology, size: int = 20_000, seed: int = 0) -> None:
        self.features = topology.features
        self._rows: list[tuple[bytes, bytes]] = []
        for key, value in itertools.islice(synthetic_events(topology, seed), size):
            doc = orjson.loads(value)
            self._rows.append((key, orjson.dumps(doc["features"])))

    def mean_event_bytes(self, sample: int = 2_000) -> float:
        """The mean size of a stamped event's value (JSON bytes), over the first ``sample``."""
        values = [len(v) for _k, v in itertools.islice(self.stamped(1), sample)]
        return sum(values) / max(1, len(values))

    def stamped(self, seed: int) -> Iterator[tuple[bytes, bytes]]:
        """Endless (key, value) events with ids ``evt-<seed>-<n>`` and ``ts`` = now."""
        clock = time.time
        for n, (key, features) in enumerate(itertools.cycle(self._rows)):
            yield key, b'{"id":"evt-%d-%d","features":%b,"ts":%r}' % (seed, n, features, clock())


_POOLS: dict[tuple[str, ...], EventPool] = {}


def pool_for(topology: Topology, max_bytes: int = 64 << 20) -> EventPool:
    """One pool per feature list, made on first use and kept (making one costs seconds). Wide
    events make a smaller pool (at most ``max_bytes`` of feature JSON, at least 2,000 events):
    the pool is cycled, so its size only bounds how often a row repeats."""
    pool = _POOLS.get(topology.features)
    if pool is None:
        per_event = 30 * len(topology.features) + 40  # ~bytes of one row of synthetic floats
        size = max(2_000, min(20_000, max_bytes // per_event))
        pool = _POOLS[topology.features] = EventPool(topology, size=size)
    return pool
