"""Learner snapshots at start: a snapshot made for another topology or a corrupt one is refused
(ERROR line, a count, the file kept aside, the learner fresh), never a failed start; each worker
writes its own file; a restart restores exactly what was learned, even when the control log
holds a reset_learner older than the snapshot."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orjson
import pytest

from stream_infer.core.control import parse_command
from stream_infer.online.learner import OnlineLearner
from stream_infer.runtime.worker import InferenceRuntime
from stream_infer.settings import LearnerSettings, Topology, parse_topology

TOPICS = {
    "input": "in",
    "predictions": "out",
    "dead_letter": "dlq",
    "control": "ctl",
    "labels": "labels",
}


def topology(
    state: Path, features: tuple[str, ...] = ("a", "b"), worker: str = "pod-0", **learner: Any
) -> Topology:
    return parse_topology(
        {
            "name": "t",
            "topics": TOPICS,
            "features": list(features),
            "models": [
                {"name": "risk", "serving": "v1", "versions": [{"version": "v1", "path": "m"}]}
            ],
            "online": {
                "learners": [{"model": "risk", "version": "online", **learner}],
                "snapshot_dir": str(state),
            },
            "worker": {"id": worker},
            "device": "cpu",
        },
        env={},
    )


def runtime(topo: Topology) -> InferenceRuntime:
    return InferenceRuntime(topo)


def close(rt: InferenceRuntime) -> None:
    rt.threads.inference.shutdown(wait=False)
    rt.threads.loader.shutdown(wait=False)
    rt.models.watchdog.close()


def trained(n: int, features: tuple[str, ...] = ("a", "b"), **kw: Any) -> OnlineLearner:
    learner = OnlineLearner("risk", "online", features, **kw)
    for i in range(n):
        learner.learn_one(dict.fromkeys(features, float(i % 7)), i % 2 == 0)
    return learner


def start_learner(rt: InferenceRuntime) -> OnlineLearner:
    spec = rt.topology.online.learners[0]
    assert rt.learning is not None
    learner = rt.learning.learner_for(spec)
    rt.models.predictors[(spec.model, spec.version)] = learner
    return learner


def refused(rt: InferenceRuntime, reason: str) -> float:
    value = rt.metrics.registry.get_sample_value(
        "stream_infer_learner_snapshots_refused_total",
        {"model": "risk", "version": "online", "reason": reason},
    )
    return float(value or 0.0)


def write_own(rt: InferenceRuntime, learner: OnlineLearner) -> Path:
    """Put a snapshot where this runtime's worker reads its own."""
    assert rt.learning is not None and rt.learning.snapshots is not None
    path = rt.learning.snapshots.path("risk", "online")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(learner.snapshot())
    return path


# --- item 14 ---------------------------------------------------------------------------------


def test_a_snapshot_of_other_features_is_refused_and_the_learner_starts_fresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = runtime(topology(tmp_path))
    path = write_own(old, trained(100))
    close(old)
    # The topology's feature list changed: the old snapshot would fail on every event.
    rt = runtime(topology(tmp_path, features=("a", "b", "c")))
    try:
        with caplog.at_level(logging.ERROR):
            learner = start_learner(rt)
        assert learner.features == ("a", "b", "c") and learner.n_learned == 0
        assert refused(rt, "mismatch") == 1
        assert "made for another topology" in caplog.text and "features" in caplog.text
        assert not path.exists()
        assert [p.name.split(".rejected-")[0] for p in path.parent.iterdir()] == [path.name]
    finally:
        close(rt)


@pytest.mark.parametrize(
    ("field", "value"), [("kind", "hoeffding_tree"), ("scale", False)], ids=["kind", "scale"]
)
def test_a_snapshot_of_another_kind_or_scale_is_refused(
    tmp_path: Path, field: str, value: Any
) -> None:
    old = runtime(topology(tmp_path))
    write_own(old, trained(50))
    close(old)
    rt = runtime(topology(tmp_path, **{field: value}))
    try:
        learner = start_learner(rt)
        assert getattr(learner, field) == value and learner.n_learned == 0
        assert refused(rt, "mismatch") == 1
    finally:
        close(rt)


def test_a_corrupt_snapshot_does_not_stop_the_start_and_is_kept_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rt = runtime(topology(tmp_path))
    try:
        data = trained(100).snapshot()
        path = write_own(rt, trained(100))
        path.write_bytes(data[: len(data) // 2])  # a write cut short (an old, non-atomic one)
        with caplog.at_level(logging.ERROR):
            learner = start_learner(rt)
        assert learner.n_learned == 0
        assert refused(rt, "corrupt") == 1
        assert "truncated" in caplog.text
        (aside,) = path.parent.iterdir()
        assert aside.name.startswith(path.name + ".rejected-")
        assert aside.read_bytes() == data[: len(data) // 2]
    finally:
        close(rt)


def test_workers_on_one_volume_write_their_own_files_and_restore_their_own(
    tmp_path: Path,
) -> None:
    a, b = runtime(topology(tmp_path, worker="pod-a")), runtime(topology(tmp_path, worker="pod-b"))
    try:
        for rt, n in ((a, 30), (b, 70)):
            rt.models.predictors[("risk", "online")] = trained(n)
            assert rt.learning is not None and rt.learning.snapshot() == 0
        files = sorted(p.name for p in (tmp_path / "risk" / "online").iterdir())
        assert files == ["pod-a.snapshot", "pod-b.snapshot"]
        assert start_learner(runtime(topology(tmp_path, worker="pod-a"))).n_learned == 30
        assert start_learner(runtime(topology(tmp_path, worker="pod-b"))).n_learned == 70
        # A new pod (a new name: a Deployment) starts from the freshest snapshot there is.
        assert start_learner(runtime(topology(tmp_path, worker="pod-c"))).n_learned == 70
    finally:
        close(a)
        close(b)


def test_the_worker_id_defaults_to_the_host_name(tmp_path: Path) -> None:
    import socket

    topo = topology(tmp_path).model_copy(
        update={"worker": topology(tmp_path).worker.model_copy(update={"id": None})}
    )
    rt = runtime(topo)
    try:
        assert rt.learning is not None and rt.learning.snapshots is not None
        assert rt.learning.snapshots.worker.startswith(socket.gethostname()[:10].strip("."))
    finally:
        close(rt)


def test_a_worker_id_that_is_no_file_name_is_refused(tmp_path: Path) -> None:
    from stream_infer.errors import ConfigError

    with pytest.raises(ConfigError, match=r"worker\.id"):
        topology(tmp_path, worker="../other")


# --- item 7 ----------------------------------------------------------------------------------


def command(doc: dict[str, Any]) -> bytes:
    return orjson.dumps(doc)


SWAP = {"id": "c-1", "command": "swap", "model": "risk", "version": "online"}
RESET = {"id": "c-2", "command": "reset_learner", "model": "risk", "version": "online"}


def test_replay_does_not_wipe_a_learner_restored_after_the_reset(tmp_path: Path) -> None:
    # Life before the restart: the reset at control offset 1 is applied live, then 1000 labels
    # are learned, and the snapshot is written at shutdown.
    before = runtime(topology(tmp_path))
    try:
        learner = start_learner(before)
        learner.learn_one({"a": 1.0, "b": 1.0}, True)
        before.control.reset_learner(parse_command(command(RESET)), 1)
        for i in range(1000):
            learner.learn_one({"a": float(i % 7), "b": 1.0}, i % 2 == 0)
        assert before.learning is not None and before.learning.snapshot() == 0
    finally:
        close(before)
    # The restart: the learner is restored, then the whole control log is replayed.
    rt = runtime(topology(tmp_path))
    try:
        restored = start_learner(rt)
        assert restored.n_learned == 1000 and restored.control_offset == 1
        for offset, doc in enumerate((SWAP, RESET)):
            _, error = rt.control.apply(command(doc), replay=True, offset=offset)
            assert error is None, error
        assert rt.models.predictors[("risk", "online")].n_learned == 1000  # type: ignore[attr-defined]
        # A reset the snapshot has not seen (a later offset) still resets.
        _, error = rt.control.apply(command(RESET | {"id": "c-3"}), replay=True, offset=2)
        assert error is None and restored.n_learned == 0 and restored.control_offset == 2
    finally:
        close(rt)


def test_a_snapshot_without_a_control_offset_replays_every_reset(tmp_path: Path) -> None:
    """Snapshots written before the offset was recorded: the replay resets as it always did."""
    rt = runtime(topology(tmp_path))
    try:
        learner = trained(10)
        assert learner.control_offset == -1
        write_own(rt, learner)
        restored = start_learner(rt)
        rt.control.reset_learner(parse_command(command(RESET)), 0)
        assert restored.n_learned == 0
    finally:
        close(rt)


def test_learner_settings_still_build_a_fresh_learner_without_a_folder() -> None:
    topo = parse_topology(
        {
            "name": "t",
            "topics": TOPICS,
            "features": ["a", "b"],
            "models": [
                {"name": "risk", "serving": "v1", "versions": [{"version": "v1", "path": "m"}]}
            ],
            "online": {"learners": [{"model": "risk"}]},
            "device": "cpu",
        },
        env={},
    )
    rt = runtime(topo)
    try:
        assert rt.learning is not None
        learner = rt.learning.learner_for(LearnerSettings(model="risk"))
        assert learner.n_learned == 0 and learner.features == ("a", "b")
    finally:
        close(rt)
