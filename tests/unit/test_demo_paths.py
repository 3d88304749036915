"""The demo's files: `stream-infer demo` with no --topology reads the checkout's
topologies/phishing-online.yaml and works under the checkout's .demo/. A move of demo.py broke
the first (it looked under stream_infer/); this catches that without running the demo."""

from __future__ import annotations

from pathlib import Path

from stream_infer.local import demo
from stream_infer.settings import load_topology

CHECKOUT = Path(__file__).resolve().parents[2]


def test_the_default_topology_is_the_checkouts_and_loads() -> None:
    assert demo.ROOT == CHECKOUT
    assert demo.DEFAULT_TOPOLOGY == CHECKOUT / "topologies" / "phishing-online.yaml"
    topology = load_topology(demo.DEFAULT_TOPOLOGY, env={})
    assert topology.online.enabled
