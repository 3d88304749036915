"""Wire types: what travels between the decoder, the model and the publisher.

The JSON contracts live in schemas/*.schema.json; these classes are their in-memory form.
Records from Kafka are read through the small :class:`Record` protocol, which
``confluent_kafka.Message`` satisfies as it is, so the hot path converts nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

SCHEMA_VERSION = 1


class ModelVersion(NamedTuple):
    """One version of one model: what a predictor, a learner, a metric series or a watchdog
    slot belongs to.

    >>> key = ModelVersion("risk", "v2")
    >>> key.model, key.version, key == ("risk", "v2")
    ('risk', 'v2', True)
    >>> f"{key}"
    'risk:v2'
    """

    model: str
    version: str

    def __str__(self) -> str:
        return f"{self.model}:{self.version}"


class Record(Protocol):
    """One Kafka record, as confluent_kafka.Message exposes it."""

    def value(self) -> bytes | None: ...
    def key(self) -> bytes | None: ...
    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record that could not be served, with the reason why."""

    reason: str
    detail: str
    record: Record


@dataclass(slots=True)
class FeatureBatch:
    """The valid events of one micro-batch, as one matrix.

    ``positions[i]`` is the index in the original record list of row ``i`` of ``x``.
    """

    ids: list[str]
    keys: list[bytes]
    ts: list[float | None]
    positions: list[int]
    x: npt.NDArray[np.float32]

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, rows: npt.NDArray[np.intp]) -> FeatureBatch:
        """The sub-batch of the given row indices (used to split traffic between versions)."""
        idx = rows.tolist()
        return FeatureBatch(
            ids=[self.ids[i] for i in idx],
            keys=[self.keys[i] for i in idx],
            ts=[self.ts[i] for i in idx],
            positions=[self.positions[i] for i in idx],
            x=self.x[rows],
        )


@dataclass(frozen=True, slots=True)
class OutRecord:
    """A record to produce; ``source``: the input record it was made from, if any (where a
    prediction that can never be delivered is replayed from)."""

    topic: str
    key: bytes | None
    value: bytes
    source: Record | None = None


@dataclass(slots=True)
class BatchResult:
    """What processing one micro-batch produced, and what it counted."""

    records: list[OutRecord] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    served: dict[ModelVersion, int] = field(default_factory=dict)
    shadowed: dict[ModelVersion, int] = field(default_factory=dict)
    inference_s: float = 0.0
    n_in: int = 0
    event_ts: list[float] = field(default_factory=list)
    # With score tracking on (online learning): the good events, and what each version scored:
    # (model, version, event ids, values: NaN where it failed, the routing generation served).
    batch: FeatureBatch | None = None
    scored: list[tuple[str, str, list[str], npt.NDArray[np.float64], int]] = field(
        default_factory=list
    )
