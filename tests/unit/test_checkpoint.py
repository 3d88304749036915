"""The Checkpoint: offsets only for the contiguous prefix of delivered batches, never at or
past a failed one, and never for partitions revoked meanwhile."""

from __future__ import annotations

import random

import pytest

from stream_infer.io.checkpoint import Checkpoint

P0, P1 = ("in", 0), ("in", 1)


def test_offsets_are_released_only_for_the_delivered_prefix_in_order() -> None:
    cp = Checkpoint()
    seqs = [cp.begin({P0: 10 * (i + 1)}) for i in range(4)]
    assert seqs == [0, 1, 2, 3] and cp.in_flight == 4
    cp.delivered(1)
    cp.delivered(2)
    assert cp.release() == {}  # 0 is not delivered: nothing after it either
    assert not cp.settled
    cp.delivered(0)
    assert cp.release() == {P0: 30}  # 0, 1, 2 merged: the last one's offset
    assert cp.release() == {}  # released once
    cp.delivered(3)
    assert cp.release() == {P0: 40}
    assert cp.in_flight == 0 and cp.settled


def test_batches_over_several_partitions_merge_per_partition() -> None:
    cp = Checkpoint()
    cp.begin({P0: 5, P1: 7})
    cp.begin({P1: 9})
    cp.delivered(0)
    cp.delivered(1)
    assert cp.release() == {P0: 5, P1: 9}


def test_a_failed_batch_latches_nothing_at_or_after_it_is_ever_released() -> None:
    """Hardening item 1: batches delivered after a failed one were committed past it."""
    cp = Checkpoint()
    for i in range(5):
        cp.begin({P0: i + 1})
    cp.fail(2, "publish raised")
    for seq in (4, 3, 2, 1, 0):
        cp.delivered(seq)  # even the failed one, late: it stays failed
    assert cp.release() == {P0: 2}  # 0 and 1 only
    assert cp.release() == {}
    assert cp.failed and cp.failed_at == 2 and cp.failure == "publish raised"
    assert cp.settled  # nothing before the failure is waiting
    with pytest.raises(RuntimeError, match="batch 2 failed"):
        cp.begin({P0: 9})  # nothing more is handed out


def test_an_earlier_failure_moves_the_latch_back_a_later_one_does_not() -> None:
    cp = Checkpoint()
    for i in range(4):
        cp.begin({P0: i + 1})
    cp.fail(3, "late")
    cp.fail(1, "early")
    cp.fail(2, "between")
    assert cp.failed_at == 1 and cp.failure == "early"
    cp.delivered(0)
    assert cp.release() == {P0: 1}


def test_settled_waits_only_for_the_batches_before_the_failure() -> None:
    cp = Checkpoint()
    for i in range(3):
        cp.begin({P0: i + 1})
    cp.fail(1, "x")
    assert not cp.settled  # batch 0 may still be delivered: its offsets are worth waiting for
    cp.delivered(0)
    assert cp.settled  # 1 never will, 2 does not matter


def test_revoked_partitions_are_dropped_from_batches_not_yet_released() -> None:
    cp = Checkpoint()
    cp.begin({P0: 5, P1: 5})
    cp.begin({P0: 8})
    cp.delivered(0)
    assert cp.release() == {P0: 5, P1: 5}
    cp.begin({P1: 9})  # 2
    cp.revoke([P1])
    cp.delivered(1)
    cp.delivered(2)
    assert cp.release() == {P0: 8}  # batch 2 keeps nothing for the revoked partition


def test_unknown_sequence_numbers_are_ignored() -> None:
    cp = Checkpoint()
    cp.begin({P0: 1})
    cp.delivered(7)
    cp.delivered(-1)
    assert cp.release() == {} and cp.in_flight == 1


def test_any_delivery_order_releases_exactly_the_prefix() -> None:
    """Property: whatever the order of deliveries, what is released at each step is the
    longest delivered prefix, and the offsets released never go backwards."""
    rng = random.Random(13)
    for _ in range(200):
        cp = Checkpoint()
        n = rng.randint(1, 12)
        for i in range(n):
            cp.begin({P0: i + 1})
        order = list(range(n))
        rng.shuffle(order)
        fail_at = rng.choice([None, *range(n)])
        if fail_at is not None:
            cp.fail(fail_at, "x")
        done: set[int] = set()
        released = 0
        for seq in order:
            cp.delivered(seq)
            done.add(seq)
            prefix = 0
            while prefix in done and prefix != fail_at:
                prefix += 1
            got = cp.release()
            if prefix > released:
                assert got == {P0: prefix}
                released = prefix
            else:
                assert got == {}
        assert released == (n if fail_at is None else fail_at)
