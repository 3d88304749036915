"""Synthetic events (issue 18 item 9): ids never repeat across runs unless a seed is given."""

from __future__ import annotations

import itertools
from pathlib import Path

import orjson

from stream_infer.local.loadgen import synthetic_events
from stream_infer.settings import load_topology

TOPOLOGY = Path(__file__).resolve().parents[2] / "topologies" / "phishing.yaml"


def ids(seed: int | None, n: int = 3) -> list[str]:
    topo = load_topology(TOPOLOGY, env={})
    return [orjson.loads(v)["id"] for _, v in itertools.islice(synthetic_events(topo, seed), n)]


def test_two_runs_without_a_seed_never_share_an_id() -> None:
    first, second = ids(None), ids(None)
    assert not set(first) & set(second)


def test_a_seed_repeats_a_run() -> None:
    assert ids(7) == ids(7) == ["evt-7-0", "evt-7-1", "evt-7-2"]
