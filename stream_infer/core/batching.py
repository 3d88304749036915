"""The micro-batcher: a batch closes at ``max_batch_size`` items or ``max_wait_ms`` after its
first item arrived, whichever comes first. Time comes from an injected monotonic clock, so the
batcher is tested with a fake one and never reads wall-clock time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class MicroBatcher(Generic[T]):
    """Collects items into batches bounded in size and in waiting time.

    >>> now = [0.0]  # a fake monotonic clock, in seconds
    >>> b = MicroBatcher(max_batch_size=3, max_wait_ms=10, clock=lambda: now[0])
    >>> b.add_many([1, 2])  # the batch opens with its first item; not full yet
    []
    >>> b.poll() is None, b.time_left_s()
    (True, 0.01)
    >>> now[0] = 0.010  # 10 ms later: its wait is over
    >>> b.poll()
    [1, 2]
    >>> b.add_many([3, 4, 5, 6])  # full batches close at once; 6 waits in the next
    [[3, 4, 5]]
    >>> len(b), b.flush()
    (1, [6])
    """

    def __init__(
        self,
        max_batch_size: int,
        max_wait_ms: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch_size < 1:
            msg = f"max_batch_size must be >= 1, got {max_batch_size}"
            raise ValueError(msg)
        if max_wait_ms < 0:
            msg = f"max_wait_ms must be >= 0, got {max_wait_ms}"
            raise ValueError(msg)
        self.max_batch_size = max_batch_size
        self.max_wait_ms = max_wait_ms
        self.clock = clock
        self._items: list[T] = []
        self._deadline: float | None = None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def room(self) -> int:
        """How many items fit before the open batch is full."""
        return self.max_batch_size - len(self._items)

    def add_many(self, items: Sequence[T]) -> list[list[T]]:
        """Add items; return the batches that became full, in order."""
        full: list[list[T]] = []
        start = 0
        while start < len(items):
            if not self._items:
                self._deadline = self.clock() + self.max_wait_ms / 1000.0
            take = items[start : start + self.room]
            self._items.extend(take)
            start += len(take)
            if not self.room:
                full.append(self._close())
        return full

    def time_left_s(self) -> float | None:
        """Seconds until the open batch must close; None when nothing is waiting."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - self.clock())

    def poll(self) -> list[T] | None:
        """Close and return the open batch if its wait is over."""
        if self._deadline is not None and self.clock() >= self._deadline:
            return self._close()
        return None

    def flush(self) -> list[T] | None:
        """Close and return the open batch now, whatever its size or age."""
        return self._close() if self._items else None

    def discard(self, keep: Callable[[T], bool]) -> int:
        """Drop waiting items for which ``keep`` is false (partitions revoked); return how many."""
        before = len(self._items)
        self._items = [item for item in self._items if keep(item)]
        if not self._items:
            self._deadline = None
        return before - len(self._items)

    def _close(self) -> list[T]:
        batch, self._items, self._deadline = self._items, [], None
        return batch
