"""What becomes of a record its topic refuses for good: a dead letter that keeps it.

The publisher calls :class:`Undeliverable` from its threads for each record no retry will
deliver (too large for the topic, invalid for the broker); the dead letter, keyed like the
record, takes its place under the same ticket, so the batch's offsets wait for it.
"""

from __future__ import annotations

from collections.abc import Callable

from stream_infer.core.events import DeadLetter, OutRecord
from stream_infer.core.serde import UNDELIVERABLE, encode_dead_letter


class Undeliverable:
    """The publisher's ``undeliverable`` callback: a refused record -> its dead letter (None
    for a dead letter: nothing else could take it). ``counted``: called with each letter's
    reason (``undeliverable``)."""

    def __init__(
        self, dead_letter_topic: str, max_bytes: int, counted: Callable[[str], object]
    ) -> None:
        self.dead_letter_topic = dead_letter_topic
        self.max_bytes = max_bytes
        self._counted = counted

    def __call__(self, record: OutRecord, why: str) -> OutRecord | None:
        if record.topic == self.dead_letter_topic:
            return None
        letter = DeadLetter(UNDELIVERABLE, why, _Produced(record))
        value = encode_dead_letter(letter, max_bytes=self.max_bytes)
        self._counted(UNDELIVERABLE)
        return OutRecord(self.dead_letter_topic, record.key, value)


class _Produced:
    """A record this worker produced, seen as a dead letter's record: where its input record
    was read from (a prediction's event), or, for a record made from no input record (a drift
    event, an ack), ``topic`` is where it was going."""

    __slots__ = ("_record",)

    def __init__(self, record: OutRecord) -> None:
        self._record = record

    def value(self) -> bytes | None:
        return self._record.value

    def key(self) -> bytes | None:
        return self._record.key

    def topic(self) -> str | None:
        source = self._record.source
        return source.topic() if source is not None else self._record.topic

    def partition(self) -> int | None:
        source = self._record.source
        return source.partition() if source is not None else None

    def offset(self) -> int | None:
        source = self._record.source
        return source.offset() if source is not None else None
