"""MicroBatcher: size and wait bounds, driven by a fake monotonic clock."""

from __future__ import annotations

import pytest

from stream_infer.core.batching import MicroBatcher


class FakeClock:
    """A monotonic clock that moves only when told to.

    The tests use waits and steps that are exact binary fractions of a second (1000, 500,
    250 ms), so deadlines compare exactly and "closes at the deadline" is tested to the tick.
    """

    def __init__(self, start_s: float = 100.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance_ms(self, ms: float) -> None:
        self.now_s += ms / 1000.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_a_batch_closes_when_it_reaches_max_size(clock: FakeClock) -> None:
    b: MicroBatcher[int] = MicroBatcher(max_batch_size=3, max_wait_ms=10, clock=clock)

    assert b.add_many([1, 2]) == []
    assert len(b) == 2
    assert b.room == 1
    assert b.add_many([3]) == [[1, 2, 3]]
    assert len(b) == 0
    assert b.room == 3
    assert b.time_left_s() is None
    clock.advance_ms(1_000)
    assert b.poll() is None


def test_the_wait_is_measured_from_the_first_item(clock: FakeClock) -> None:
    b: MicroBatcher[str] = MicroBatcher(max_batch_size=100, max_wait_ms=1000, clock=clock)

    b.add_many(["a"])
    clock.advance_ms(500)
    b.add_many(["b"])  # a later item does not push the deadline back
    clock.advance_ms(250)
    assert b.poll() is None
    clock.advance_ms(250)
    assert b.poll() == ["a", "b"]
    assert b.poll() is None
    assert len(b) == 0


def test_the_next_batch_gets_a_fresh_deadline(clock: FakeClock) -> None:
    b: MicroBatcher[int] = MicroBatcher(max_batch_size=100, max_wait_ms=1000, clock=clock)
    b.add_many([1])
    clock.advance_ms(1000)
    assert b.poll() == [1]

    clock.advance_ms(1500)
    b.add_many([2])
    clock.advance_ms(750)
    assert b.poll() is None
    clock.advance_ms(250)
    assert b.poll() == [2]


def test_time_left_counts_down_and_never_goes_negative(clock: FakeClock) -> None:
    b: MicroBatcher[int] = MicroBatcher(max_batch_size=100, max_wait_ms=1000, clock=clock)
    assert b.time_left_s() is None

    b.add_many([1])
    assert b.time_left_s() == 1.0
    clock.advance_ms(750)
    assert b.time_left_s() == 0.25
    clock.advance_ms(5000)
    assert b.time_left_s() == 0.0
    assert b.poll() == [1]
    assert b.time_left_s() is None


def test_zero_wait_closes_on_the_next_poll(clock: FakeClock) -> None:
    b: MicroBatcher[int] = MicroBatcher(max_batch_size=100, max_wait_ms=0, clock=clock)
    b.add_many([1, 2])
    assert b.time_left_s() == 0.0
    assert b.poll() == [1, 2]


def test_add_many_returns_every_batch_it_fills_in_order(clock: FakeClock) -> None:
    b: MicroBatcher[int] = MicroBatcher(max_batch_size=3, max_wait_ms=10, clock=clock)
    b.add_many([-1])

    assert b.add_many(list(range(7))) == [[-1, 0, 1], [2, 3, 4]]
    assert len(b) == 2
    assert b.flush() == [5, 6]


def test_add_many_of_exact_multiples_leaves_nothing_waiting(clock: FakeClock) -> None:
    b: MicroBatcher[int] = MicroBatcher(max_batch_size=2, max_wait_ms=10, clock=clock)
    assert b.add_many([1, 2, 3, 4, 5, 6]) == [[1, 2], [3, 4], [5, 6]]
    assert len(b) == 0
    assert b.time_left_s() is None


def test_leftover_of_add_many_waits_from_when_it_was_added(clock: FakeClock) -> None:
    b: MicroBatcher[int] = MicroBatcher(max_batch_size=2, max_wait_ms=1000, clock=clock)
    b.add_many([1])
    clock.advance_ms(500)
    assert b.add_many([2, 3]) == [[1, 2]]
    clock.advance_ms(750)  # 1250 ms after 1 arrived, 750 ms after 3 arrived
    assert b.poll() is None
    clock.advance_ms(250)
    assert b.poll() == [3]


def test_batch_size_one_closes_every_item(clock: FakeClock) -> None:
    b: MicroBatcher[int] = MicroBatcher(max_batch_size=1, max_wait_ms=10, clock=clock)
    assert b.add_many([1, 2, 3]) == [[1], [2], [3]]
    assert b.time_left_s() is None


def test_adding_nothing_opens_no_batch(clock: FakeClock) -> None:
    b: MicroBatcher[int] = MicroBatcher(max_batch_size=3, max_wait_ms=10, clock=clock)
    assert b.add_many([]) == []
    assert b.time_left_s() is None
    assert b.flush() is None


def test_flush_closes_the_open_batch_whatever_its_age(clock: FakeClock) -> None:
    b: MicroBatcher[int] = MicroBatcher(max_batch_size=10, max_wait_ms=1_000, clock=clock)
    assert b.flush() is None
    b.add_many([1, 2])
    assert b.flush() == [1, 2]
    assert b.flush() is None
    assert b.time_left_s() is None
    clock.advance_ms(5_000)
    assert b.poll() is None


def test_discard_keeps_order_and_the_deadline(clock: FakeClock) -> None:
    b: MicroBatcher[int] = MicroBatcher(max_batch_size=10, max_wait_ms=1000, clock=clock)
    b.add_many([1, 2, 3, 4, 5])
    clock.advance_ms(250)

    assert b.discard(lambda item: item % 2 == 1) == 2
    assert len(b) == 3
    assert b.time_left_s() == 0.75
    clock.advance_ms(750)
    assert b.poll() == [1, 3, 5]


def test_discarding_everything_clears_the_deadline(clock: FakeClock) -> None:
    b: MicroBatcher[int] = MicroBatcher(max_batch_size=10, max_wait_ms=1000, clock=clock)
    b.add_many([1, 2])
    assert b.discard(lambda item: False) == 2
    assert b.time_left_s() is None
    clock.advance_ms(2000)
    assert b.poll() is None

    b.add_many([3])  # a new batch starts a new wait
    assert b.time_left_s() == 1.0


def test_discard_of_nothing_changes_nothing(clock: FakeClock) -> None:
    b: MicroBatcher[int] = MicroBatcher(max_batch_size=10, max_wait_ms=10, clock=clock)
    assert b.discard(lambda item: False) == 0
    b.add_many([1])
    assert b.discard(lambda item: True) == 0
    assert b.flush() == [1]


@pytest.mark.parametrize(
    ("size", "wait_ms", "message"),
    [
        (0, 10, "max_batch_size must be >= 1, got 0"),
        (-5, 10, "max_batch_size must be >= 1, got -5"),
        (1, -1, "max_wait_ms must be >= 0, got -1"),
    ],
)
def test_invalid_arguments_are_refused(size: int, wait_ms: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MicroBatcher(max_batch_size=size, max_wait_ms=wait_ms)


def test_the_default_clock_is_monotonic() -> None:
    import time

    assert MicroBatcher(max_batch_size=1, max_wait_ms=0).clock is time.monotonic
