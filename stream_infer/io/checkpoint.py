"""The one place that decides which input offsets may be committed.

The promise: an input offset is committed only after every record produced for the records
before it is acknowledged, in order, and never past a batch that failed.

Batches are numbered in the order they are handed out (:meth:`Checkpoint.begin`). A batch is
*delivered* (:meth:`Checkpoint.delivered`) once every record produced for it is acknowledged;
batches may be delivered in any order, but their offsets are *released* for storing
(:meth:`Checkpoint.release`) only for the longest prefix of sequence numbers that are all
delivered::

    handed out   0  1  2  3  4  5
    delivered    x  x     x  x          release() -> offsets of 0, 1; then nothing until 2

:meth:`Checkpoint.fail` latches: no batch at or after the failed one is ever released, so the
source hands out nothing more and a revocation or close commits the prefix before it. The
next owner of the partitions (or this worker, restarted) reads again from there.

A revocation (:meth:`Checkpoint.revoke`) drops the revoked partitions from the batches not yet
released: their new owner re-reads them from the committed offset, and a batch delivered
late must not store an offset for a partition this worker no longer owns.

Plain Python, no Kafka and no locks: its owner (the batch source) serialises the calls. In the
spirit of quixstreams' ``Checkpoint`` (produce, confirm delivery, then commit).
"""

from __future__ import annotations

from collections.abc import Iterable

# (topic, partition) -> the offset after the batch's last record there.
Offsets = dict[tuple[str, int], int]


class Checkpoint:
    """Offsets of a contiguous prefix of delivered batches, and a latch for a failed one.

    >>> cp = Checkpoint()
    >>> first, second = cp.begin({("events", 0): 10}), cp.begin({("events", 0): 20})
    >>> cp.delivered(second)
    >>> cp.release()  # the second waits for the first
    {}
    >>> cp.delivered(first)
    >>> cp.release()  # both, merged: the later offset wins
    {('events', 0): 20}
    >>> third, fourth = cp.begin({("events", 1): 5}), cp.begin({("events", 1): 9})
    >>> cp.fail(third, "a record cannot be delivered")
    >>> cp.delivered(fourth)
    >>> cp.release(), cp.failed, cp.settled  # nothing at or after the failed batch, ever
    ({}, True, True)
    """

    def __init__(self) -> None:
        self._next = 0  # sequence number of the next batch handed out
        self._released = 0  # every batch below this has been released
        self._open: dict[int, Offsets] = {}  # handed out, not released, by sequence number
        self._delivered: set[int] = set()  # of the open ones
        self._failed_at: int | None = None
        self.failure: str | None = None  # why the first failed batch failed

    def begin(self, offsets: Offsets) -> int:
        """A batch is handed out: its sequence number. Refused once a batch failed."""
        if self._failed_at is not None:
            msg = f"batch {self._failed_at} failed: nothing more is handed out ({self.failure})"
            raise RuntimeError(msg)
        seq = self._next
        self._next += 1
        self._open[seq] = dict(offsets)
        return seq

    def delivered(self, seq: int) -> None:
        """Every record produced for batch ``seq`` is acknowledged."""
        if seq in self._open:
            self._delivered.add(seq)

    def drop(self, seq: int) -> None:
        """Batch ``seq`` was rewound (exactly_once: its transaction, or one before it, was
        aborted): it releases no offset, its records are read and served again in a later
        batch, and nothing waits for it any more.

        >>> cp = Checkpoint()
        >>> first, second = cp.begin({("events", 0): 10}), cp.begin({("events", 0): 20})
        >>> cp.drop(second)
        >>> cp.delivered(first)
        >>> cp.release(), cp.in_flight, cp.settled
        ({('events', 0): 10}, 0, True)
        """
        if seq in self._open:
            self._open[seq] = {}
            self._delivered.add(seq)

    def fail(self, seq: int, reason: str) -> None:
        """Batch ``seq`` cannot be served: nothing at or after it is ever released."""
        if self._failed_at is None or seq < self._failed_at:
            self._failed_at = seq
            self.failure = reason

    def release(self) -> Offsets:
        """The offsets of the batches newly released: the delivered prefix (before any failed
        batch), merged in order (a later batch's offset replaces an earlier one's)."""
        out: Offsets = {}
        end = self._next if self._failed_at is None else self._failed_at
        while self._released < end and self._released in self._delivered:
            self._delivered.discard(self._released)
            out.update(self._open.pop(self._released))
            self._released += 1
        return out

    def revoke(self, partitions: Iterable[tuple[str, int]]) -> None:
        """These partitions are no longer ours: no open batch stores an offset for them."""
        gone = set(partitions)
        for offsets in self._open.values():
            for tp in gone & offsets.keys():
                del offsets[tp]

    @property
    def failed(self) -> bool:
        return self._failed_at is not None

    @property
    def failed_at(self) -> int | None:
        """The sequence number of the first failed batch (None while none failed)."""
        return self._failed_at

    @property
    def in_flight(self) -> int:
        """Batches handed out and not yet delivered (failed ones included)."""
        return len(self._open) - len(self._delivered)

    @property
    def settled(self) -> bool:
        """Nothing more can be released by waiting: every batch before the failed one (every
        batch, while none failed) is delivered."""
        end = self._next if self._failed_at is None else self._failed_at
        return all(seq in self._delivered for seq in range(self._released, end))

    def __repr__(self) -> str:
        return (
            f"Checkpoint(handed_out={self._next}, released={self._released}, "
            f"in_flight={self.in_flight}, failed_at={self._failed_at})"
        )
