"""Traffic splits: weighted, sticky per key, stable across processes, monotone on reweighting."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from stream_infer.core.routing import BUCKETS, Route, key_buckets

KEYS = [f"user-{i}".encode() for i in range(20_000)]


def owners(route: Route, keys: list[bytes]) -> dict[bytes, str]:
    """key -> the version that serves it."""
    out: dict[bytes, str] = {}
    for version, rows in route.assign(keys):
        for row in rows.tolist():
            assert keys[row] not in out, "a row was assigned twice"
            out[keys[row]] = version
    return out


def test_key_buckets_are_crc32_mod_buckets() -> None:
    # Literal values: a change of hash function (or to Python's salted hash()) fails here.
    assert key_buckets([b"hello", b"user-1", b"", b"evt-0-0"]).tolist() == [870, 7524, 0, 3999]
    sample = KEYS[:500]
    assert key_buckets(sample).tolist() == [zlib.crc32(k) % BUCKETS for k in sample]
    assert key_buckets([]).shape == (0,)


def test_a_single_version_gets_every_row() -> None:
    groups = Route.single("v1").assign([b"a", b"b", b"c"])
    assert [(v, rows.tolist()) for v, rows in groups] == [("v1", [0, 1, 2])]
    assert Route.single("v1").assign([]) == []
    assert Route.single("v1").versions == ("v1",)


def test_a_split_shares_traffic_by_weight() -> None:
    route = Route.split({"v1": 0.9, "v2": 0.1}, order=["v1", "v2"])
    by_version = owners(route, KEYS)

    assert len(by_version) == len(KEYS)
    share_v2 = sum(v == "v2" for v in by_version.values()) / len(KEYS)
    assert abs(share_v2 - 0.1) < 0.01


def test_rows_come_back_in_order_and_typed() -> None:
    route = Route.split({"v1": 0.5, "v2": 0.5}, order=["v1", "v2"])
    groups = route.assign(KEYS[:1000])
    assert [v for v, _ in groups] == ["v1", "v2"]
    for _, rows in groups:
        assert rows.dtype == np.intp
        assert rows.tolist() == sorted(rows.tolist())
    assert sorted(np.concatenate([r for _, r in groups]).tolist()) == list(range(1000))


def test_the_same_key_always_gets_the_same_version() -> None:
    weights = {"v1": 0.5, "v2": 0.3, "v3": 0.2}
    first = owners(Route.split(weights, order=["v1", "v2", "v3"]), KEYS)
    again = owners(Route.split(dict(reversed(weights.items())), order=["v1", "v2", "v3"]), KEYS)
    assert first == again
    # In a small batch, in another order, with duplicates: still the same version per key.
    batch = [KEYS[7], KEYS[3], KEYS[7], KEYS[19_999], KEYS[3]]
    route = Route.split(weights, order=["v1", "v2", "v3"])
    assert owners(route, list(dict.fromkeys(batch))) == {k: first[k] for k in batch}
    for version, rows in route.assign(batch):
        assert {first[batch[r]] for r in rows.tolist()} == {version}


def test_versions_own_contiguous_bucket_ranges_in_declared_order() -> None:
    route = Route.split({"v3": 0.2, "v1": 0.5, "v2": 0.3}, order=["v1", "v2", "v3"])
    assert route.versions == ("v1", "v2", "v3")
    buckets = dict(zip(KEYS, key_buckets(KEYS).tolist(), strict=True))
    for key, version in owners(route, KEYS).items():
        b = buckets[key]
        assert version == ("v1" if b < 5000 else "v2" if b < 8000 else "v3"), (key, b)


def test_raising_a_weight_moves_keys_only_toward_it() -> None:
    before = owners(Route.split({"v1": 0.9, "v2": 0.1}, order=["v1", "v2"]), KEYS)
    after = owners(Route.split({"v1": 0.5, "v2": 0.5}, order=["v1", "v2"]), KEYS)

    moves = {(before[k], after[k]) for k in KEYS if before[k] != after[k]}
    assert moves == {("v1", "v2")}
    moved = sum(before[k] != after[k] for k in KEYS) / len(KEYS)
    assert abs(moved - 0.4) < 0.01


def test_zero_weights_are_dropped() -> None:
    route = Route.split({"v1": 0.0, "v2": 1.0}, order=["v1", "v2"])
    assert route.versions == ("v2",)
    assert set(owners(route, KEYS[:100]).values()) == {"v2"}


def test_a_split_may_name_a_subset_of_versions() -> None:
    route = Route.split({"v2": 0.25, "v3": 0.75}, order=["v1", "v2", "v3"])
    assert route.weights == (("v2", 0.25), ("v3", 0.75))


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"v1": 1.2, "v2": -0.2}, "weights must not be negative"),
        ({"v1": 0.5, "v2": 0.4}, "weights must sum to 1, they sum to 0.9"),
        ({"v1": 0.7, "v2": 0.7}, "weights must sum to 1, they sum to 1.4"),
        ({}, "weights must sum to 1, they sum to 0"),
        ({"v1": 0.5, "v9": 0.5}, r"unknown versions \['v9'\]"),
    ],
)
def test_invalid_splits_are_refused(weights: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Route.split(weights, order=["v1", "v2"])


def test_weights_within_rounding_of_one_are_accepted() -> None:
    route = Route.split({"v1": 0.1, "v2": 0.2, "v3": 0.7}, order=["v1", "v2", "v3"])
    assert sum(w for _, w in route.weights) == pytest.approx(1.0)


def test_shadow_and_as_dict() -> None:
    route = Route.split({"v1": 0.75, "v2": 0.25}, order=["v1", "v2"]).with_shadow("v3")
    assert route.shadow == "v3"
    assert route.as_dict() == {"weights": {"v1": 0.75, "v2": 0.25}, "shadow": "v3"}
    assert route.with_shadow(None).shadow is None
    assert Route.single("v1").as_dict() == {"weights": {"v1": 1.0}, "shadow": None}
