"""The rollout demo's topology: the example one with v3-degraded, labels joined for rollouts,
no drift policy that could cancel a rollout."""

from __future__ import annotations

from pathlib import Path

from stream_infer.core.control import rollout_plan
from stream_infer.local.demo import DEFAULT_TOPOLOGY, ROLLOUT_PLAN, rollout_topology
from stream_infer.settings import load_topology


def test_the_rollout_demo_topology_loads_with_the_degraded_version(tmp_path: Path) -> None:
    path = rollout_topology(DEFAULT_TOPOLOGY, tmp_path / "rollout.yaml")
    topo = load_topology(path, env={})
    model = topo.models[0]
    assert "v3-degraded" in topo.versions_of(model.name)
    paths = {v.version: v.path for v in model.versions}
    assert paths["v3-degraded"].parent == paths["v1"].parent
    assert topo.online.rollouts and topo.online.policies == ()
    assert topo.topics.labels and topo.topics.shadow  # step 0 shadows the candidate
    assert rollout_plan(ROLLOUT_PLAN).steps[0].weight == 0.0
