"""Which version serves which event: weighted, sticky traffic splits and shadows.

An event's entity key is hashed with CRC-32 (stable across processes, machines and Python
versions; never Python's ``hash()``) into one of ``BUCKETS`` buckets. Versions own contiguous
bucket ranges in a fixed order (the order the topology declares them), so a key stays on its
version while the weights stand, and when one version's weight grows at the expense of the
others next to it, keys move only toward it.

>>> keys = [b"user-1", b"user-2", b"user-3", b"user-4", b"user-5"]
>>> key_buckets(keys).tolist()
[7524, 3150, 584, 7483, 1629]
>>> canary = Route.split({"v1": 0.5, "v2": 0.5}, order=("v1", "v2"))
>>> [(version, rows.tolist()) for version, rows in canary.assign(keys)]
[('v1', [1, 2, 4]), ('v2', [0, 3])]
>>> grown = Route.split({"v1": 0.2, "v2": 0.8}, order=("v1", "v2"))
>>> [(version, rows.tolist()) for version, rows in grown.assign(keys)]
[('v1', [2, 4]), ('v2', [0, 1, 3])]
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

BUCKETS = 10_000
WEIGHT_TOLERANCE = 1e-6


def key_buckets(keys: Sequence[bytes]) -> npt.NDArray[np.int64]:
    """The bucket of each key: ``crc32(key) % BUCKETS``."""
    crc = zlib.crc32
    hashes = np.fromiter((crc(k) for k in keys), dtype=np.int64, count=len(keys))
    return hashes % BUCKETS


@dataclass(frozen=True)
class Route:
    """The routing of one model: weights per version (summing to 1) and an optional shadow."""

    weights: tuple[tuple[str, float], ...]
    shadow: str | None = None

    @classmethod
    def single(cls, version: str) -> Route:
        return cls(weights=((version, 1.0),))

    @classmethod
    def split(cls, weights: Mapping[str, float], order: Sequence[str]) -> Route:
        """A split with versions in the model's declared order; zero weights are dropped.

        >>> Route.split({"v2": 0.25, "v1": 0.75, "v3": 0.0}, order=("v1", "v2", "v3")).weights
        (('v1', 0.75), ('v2', 0.25))
        >>> Route.split({"v1": 0.5}, order=("v1", "v2"))
        Traceback (most recent call last):
          ...
        ValueError: weights must sum to 1, they sum to 0.5
        """
        if any(w < 0 for w in weights.values()):
            msg = f"weights must not be negative: {dict(weights)}"
            raise ValueError(msg)
        total = sum(weights.values())
        if abs(total - 1.0) > WEIGHT_TOLERANCE:
            msg = f"weights must sum to 1, they sum to {total:g}"
            raise ValueError(msg)
        unknown = set(weights) - set(order)
        if unknown:
            msg = f"unknown versions {sorted(unknown)}"
            raise ValueError(msg)
        ordered = tuple((v, float(weights[v])) for v in order if weights.get(v, 0.0) > 0.0)
        return cls(weights=ordered)

    @property
    def versions(self) -> tuple[str, ...]:
        return tuple(v for v, _ in self.weights)

    def with_shadow(self, shadow: str | None) -> Route:
        return Route(weights=self.weights, shadow=shadow)

    def assign(self, keys: Sequence[bytes]) -> list[tuple[str, npt.NDArray[np.intp]]]:
        """Split row indices among versions: [(version, rows), ...], only non-empty groups."""
        n = len(keys)
        if len(self.weights) == 1:
            return [(self.weights[0][0], np.arange(n, dtype=np.intp))] if n else []
        bounds = np.cumsum([w for _, w in self.weights])[:-1] * BUCKETS
        owner = np.searchsorted(bounds, key_buckets(keys), side="right")
        groups = []
        for i, (version, _) in enumerate(self.weights):
            rows = np.flatnonzero(owner == i)
            if rows.size:
                groups.append((version, rows))
        return groups

    def as_dict(self) -> dict[str, object]:
        return {"weights": dict(self.weights), "shadow": self.shadow}
