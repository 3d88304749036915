"""LabelJoiner: both arrival orders, duplicates, TTL with a fake clock, capacity, shadows."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest

from stream_infer.online.joiner import Joined, LabelJoiner, Served


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def served(event_id: str, version: str = "v1", p: float = 0.7, model: str = "risk") -> Served:
    return Served(id=event_id, model=model, version=version, prediction=p, ts=1.0)


def rows(*values: float) -> np.ndarray:
    return np.array([[v, v + 0.5] for v in values], dtype=np.float32)


def test_label_after_event_joins_in_order() -> None:
    joiner = LabelJoiner(ttl_s=60, max_entries=10, clock=FakeClock())
    assert joiner.add_event_many(["a", "b"], rows(1, 2), [served("a"), served("b")]) == []
    assert joiner.pending == 2
    first = joiner.add_label_one("a", 1.0)
    second = joiner.add_label_one("b", 0.0)
    assert first == Joined("a", 1.0, (1.0, 1.5), (served("a"),))
    assert second == Joined("b", 0.0, (2.0, 2.5), (served("b"),))
    assert (joiner.joined, joiner.pending, joiner.early) == (2, 0, 0)


def test_early_label_joins_when_its_event_comes() -> None:
    joiner = LabelJoiner(ttl_s=60, max_entries=10, clock=FakeClock())
    assert joiner.add_label_one("a", 1) is None
    assert joiner.early == 1
    joins = joiner.add_event_many(["x", "a"], rows(0, 3), [served("x"), served("a")])
    assert joins == [Joined("a", 1.0, (3.0, 3.5), (served("a"),))]
    assert (joiner.joined, joiner.pending, joiner.early) == (1, 1, 0)


def test_duplicate_labels_are_counted_and_ignored() -> None:
    joiner = LabelJoiner(ttl_s=60, max_entries=10, clock=FakeClock())
    joiner.add_event_many(["a"], rows(1), [served("a")])
    assert joiner.add_label_one("a", 1.0) is not None
    assert joiner.add_label_one("a", 0.0) is None
    assert joiner.add_label_one("early", 1.0) is None
    assert joiner.add_label_one("early", 0.0) is None  # a second early label for one id
    assert (joiner.joined, joiner.duplicate_labels, joiner.early) == (1, 2, 1)
    joins = joiner.add_event_many(["early"], rows(2), [served("early")])
    assert [j.label for j in joins] == [1.0]  # the first label wins


def test_event_after_its_join_is_a_duplicate_event() -> None:
    joiner = LabelJoiner(ttl_s=60, max_entries=10, clock=FakeClock())
    joiner.add_event_many(["a"], rows(1), [served("a")])
    joiner.add_label_one("a", 1.0)
    assert joiner.add_event_many(["a"], rows(1), [served("a")]) == []
    assert (joiner.duplicate_events, joiner.pending) == (1, 0)


def test_ttl_expiry_counts_unlabelled_events() -> None:
    clock = FakeClock()
    joiner = LabelJoiner(ttl_s=10, max_entries=100, clock=clock)
    joiner.add_event_many(["a", "b"], rows(1, 2), [served("a"), served("b")])
    clock.now += 5
    joiner.add_event_many(["c"], rows(3), [served("c")])
    joiner.add_label_one("early", 1.0)
    assert joiner.expire() == 0
    clock.now += 5  # a and b are 10 s old: expired; c and the early label are 5 s old
    assert joiner.expire() == 2
    assert (joiner.expired, joiner.pending, joiner.early) == (2, 1, 1)
    assert joiner.add_label_one("a", 1.0) is None  # too late: kept as early, never joins
    clock.now += 5
    assert joiner.expire() == 1  # c
    assert (joiner.expired, joiner.expired_labels, joiner.early) == (3, 1, 1)
    assert joiner.add_label_one("c", 1.0) is None
    assert joiner.joined == 0


def test_joined_ids_are_forgotten_after_ttl() -> None:
    clock = FakeClock()
    joiner = LabelJoiner(ttl_s=10, max_entries=100, clock=clock)
    joiner.add_event_many(["a"], rows(1), [served("a")])
    joiner.add_label_one("a", 1.0)
    clock.now += 10
    joiner.expire()
    assert joiner.add_label_one("a", 1.0) is None
    assert (joiner.duplicate_labels, joiner.early) == (0, 1)  # no memory left: an early label


def test_capacity_evicts_oldest_events_and_early_labels() -> None:
    joiner = LabelJoiner(ttl_s=60, max_entries=3, clock=FakeClock())
    ids = [f"e{i}" for i in range(5)]
    joiner.add_event_many(ids, rows(*range(5)), [served(i) for i in ids])
    assert (joiner.pending, joiner.evicted) == (3, 2)
    assert joiner.add_label_one("e0", 1.0) is None  # evicted: the label waits as early
    assert joiner.add_label_one("e4", 1.0) is not None
    for i in range(4):
        joiner.add_label_one(f"late{i}", 0.0)
    assert (joiner.early, joiner.evicted) == (3, 4)  # e0's label and late0 were pushed out
    assert joiner.add_event_many(["e0"], rows(0), [served("e0")]) == []
    assert joiner.add_event_many(["late3"], rows(0), [served("late3")]) != []


def test_every_version_that_scored_an_event_is_in_its_join() -> None:
    joiner = LabelJoiner(ttl_s=60, max_entries=10, clock=FakeClock())
    primary = [served("a", "v1", 0.2), served("b", "v2", 0.9)]
    shadow = [served("a", "v3", 0.4), served("b", "v3", 0.6)]
    joiner.add_event_many(["a", "b"], rows(1, 2), primary + shadow)
    joiner.add_event_many(["a"], rows(1), [served("a", "v3", 0.4), served("a", "v4", 0.1)])
    a = joiner.add_label_one("a", 0.0)
    b = joiner.add_label_one("b", 1.0)
    assert a is not None and b is not None
    assert [(s.version, s.prediction) for s in a.served] == [("v1", 0.2), ("v3", 0.4), ("v4", 0.1)]
    assert [(s.version, s.prediction) for s in b.served] == [("v2", 0.9), ("v3", 0.6)]


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        LabelJoiner(ttl_s=0, max_entries=1)
    with pytest.raises(ValueError, match="max_entries"):
        LabelJoiner(ttl_s=1, max_entries=0)
    joiner = LabelJoiner(ttl_s=1, max_entries=1)
    with pytest.raises(ValueError, match="one row per id"):
        joiner.add_event_many(["a", "b"], rows(1), [])
    with pytest.raises(ValueError, match="unknown id"):
        joiner.add_event_many(["a"], rows(1), [served("zzz")])
    with pytest.raises(ValueError, match="finite"):
        joiner.add_label_one("a", float("nan"))


def test_events_that_expire_after_their_partition_moved_are_counted_apart() -> None:
    clock = FakeClock()
    joiner = LabelJoiner(ttl_s=60, max_entries=10, clock=clock)
    joiner.add_event_many(["a", "b", "c"], rows(1, 2, 3), [], [0, 1, 2])
    joiner.add_event_many(["d"], rows(4), [])  # partition not known: never counted as moved
    clock.now += 61
    assert joiner.expire(owned={0}) == 4
    assert joiner.expired == 4 and joiner.expired_moved == 2


def test_partitions_must_match_the_ids() -> None:
    joiner = LabelJoiner(ttl_s=60, max_entries=10)
    with pytest.raises(ValueError, match="one per id"):
        joiner.add_event_many(["a", "b"], rows(1, 2), [], [0])


# --- memory (issue 13 item 18): the bound is a count; what one entry costs is measured here ---


def _traced(work: Callable[[], object]) -> int:
    """Bytes still allocated after ``work`` (its result kept alive), by tracemalloc."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = work()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del kept
    return after - before


def _pending_bytes(n_features: int, n_versions: int, n: int = 5000) -> float:
    joiner = LabelJoiner(3600.0, n)
    x = np.random.default_rng(0).random((n, n_features)).astype(np.float32)

    def add() -> LabelJoiner:
        ids = [f"evt-{i:012d}" for i in range(n)]  # ids as the decoder makes them, kept here
        served = [Served(i, "risk", f"v{k}", 0.5, 0.0) for k in range(n_versions) for i in ids]
        joiner.add_event_many(ids, x, served, list(range(n)))
        return joiner

    return _traced(add) / n


def test_a_pending_event_costs_about_0_7_kib_plus_32_bytes_a_feature() -> None:
    base = _pending_bytes(8, 1)
    wide = _pending_bytes(30, 1)
    two_versions = _pending_bytes(8, 2)
    print(
        f"pending event: {base:.0f} B (8 features, 1 version), {wide:.0f} B (30), "
        f"{two_versions:.0f} B (8 features, 2 versions)"
    )
    assert 500 <= base <= 900  # measured 717 B on CPython 3.11
    assert 28 <= (wide - base) / 22 <= 36  # a Python float (24 B) and its tuple slot (8 B)
    assert 80 <= two_versions - base <= 200  # a Served (measured 123 B)


def test_an_early_label_costs_about_0_2_kib() -> None:
    n = 5000
    joiner = LabelJoiner(3600.0, n)

    def add() -> LabelJoiner:
        for i in range(n):
            joiner.add_label_one(f"evt-{i:012d}", 1.0)
        return joiner

    per_label = _traced(add) / n
    print(f"early label: {per_label:.0f} B")
    assert 150 <= per_label <= 300  # measured 211 B
