"""Worker state (faust's data folder) under one configurable directory, not the cwd (issue 18
item 9)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_infer.settings import load_topology

TOPOLOGY = Path(__file__).resolve().parents[2] / "topologies" / "phishing.yaml"


def test_the_state_dir_defaults_outside_the_working_directory() -> None:
    topo = load_topology(TOPOLOGY, env={})
    assert topo.worker.state_dir.is_absolute()
    assert Path.cwd() not in topo.worker.state_dir.parents


def test_faust_keeps_its_data_under_the_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stream_infer.runtime.app import create_app

    monkeypatch.chdir(tmp_path)
    env = {"STREAM_INFER_WORKER__STATE_DIR": str(tmp_path / "state" / "nested")}
    app = create_app(load_topology(TOPOLOGY, env=env))
    assert Path(app.conf.datadir) == tmp_path / "state" / "nested" / "stream-infer-phishing"
    assert Path(app.conf.datadir).is_dir()
