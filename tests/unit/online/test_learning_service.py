"""The learning thread beside serving: it survives its own failures (a snapshot folder that
cannot be written, a housekeeping bug), never blocks the inference thread for long, and says
when it is dead or stuck; joins lost to rebalances and orphaned labels are counted."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from stream_infer.core.events import FeatureBatch
from stream_infer.observability import Metrics
from stream_infer.online.joiner import LabelJoiner
from stream_infer.online.learner import OnlineLearner
from stream_infer.runtime.learning import LearningService
from stream_infer.settings import Topology, parse_topology
from tests.unit.conftest import FakeRecord

TOPICS = {
    "input": "in",
    "predictions": "out",
    "dead_letter": "dlq",
    "control": "ctl",
    "labels": "labels",
    "drift": "drift",
}


def topology(**online: Any) -> Topology:
    return parse_topology(
        {
            "name": "t",
            "topics": TOPICS,
            "features": ["a", "b"],
            "models": [
                {"name": "risk", "serving": "v1", "versions": [{"version": "v1", "path": "m"}]}
            ],
            "online": {"learners": [{"model": "risk", "version": "online"}], **online},
            "device": "cpu",
        },
        env={},
    )


def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    """Poll a condition until it holds (a deadline, not a sleep that lets the work happen)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def _value(svc: LearningService, name: str, labels: dict[str, str] | None = None) -> float:
    return float(svc.metrics.registry.get_sample_value(name, labels or {}) or 0.0)


def batch_of(ids: list[str]) -> FeatureBatch:
    n = len(ids)
    return FeatureBatch(
        ids, [b"k"] * n, [None] * n, list(range(n)), np.ones((n, 2), dtype=np.float32)
    )


def scored(ids: list[str]) -> list[tuple[str, str, list[str], Any]]:
    return [("risk", "v1", ids, np.full(len(ids), 0.3))]


def label_records(ids: list[str], partition: int = 0) -> list[FakeRecord]:
    return [
        FakeRecord(
            orjson.dumps({"id": i, "label": True}), b"k", topic="labels", partition=partition
        )
        for i in ids
    ]


def labels(ids: list[str]) -> list[tuple[str, float]]:
    """Decoded labels, as split_labels hands them on."""
    return [(i, 1.0) for i in ids]


def service(topo: Topology, learner: Any = None, **kwargs: Any) -> tuple[LearningService, Any]:
    learner = learner or OnlineLearner("risk", "online", ("a", "b"))
    svc = LearningService(
        topo,
        Metrics(),
        publish=lambda records: None,
        predictors=lambda: {("risk", "online"): learner},
        routes=lambda: {},
        **kwargs,
    )
    return svc, learner


@pytest.fixture
def stoppers() -> Iterator[list[LearningService]]:
    started: list[LearningService] = []
    yield started
    for svc in started:
        svc._stop.set()
        svc._thread.join(5)


def submit_in_thread(svc: LearningService, n: int) -> threading.Event:
    done = threading.Event()

    def inference() -> None:
        for i in range(n):
            ids = [f"x-{i}"]
            svc.submit(batch_of(ids), scored(ids), labels(ids))
        done.set()

    threading.Thread(target=inference, daemon=True).start()
    return done


# --- item 3: the learning thread survives, the inference thread never hangs on it -----------


def test_a_snapshot_folder_that_cannot_be_written_does_not_stop_learning(
    tmp_path: Path, stoppers: list[LearningService], caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")  # the snapshot folder is under a file: mkdir fails (ENOTDIR)
    topo = topology(snapshot_dir=str(blocker / "snapshots"), snapshot_interval_s=0.001)
    svc, learner = service(topo, queue_size=4)
    stoppers.append(svc)
    svc.start()
    assert wait_for(
        lambda: _value(svc, "stream_infer_learning_errors_total", {"stage": "snapshot"}) >= 1
    ), "the snapshot failure was not counted"
    assert svc.alive and svc.problem is None
    assert "snapshot of learner risk:online not written" in caplog.text
    # The inference thread's submits all go through, and every label is learned.
    assert submit_in_thread(svc, 40).wait(5.0), "the inference thread blocked in submit()"
    assert wait_for(lambda: learner.n_learned == 40), learner.n_learned
    assert svc.alive


def test_a_full_disk_keeps_the_previous_snapshot_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    topo = topology(snapshot_dir=str(tmp_path))
    svc, learner = service(topo, worker="pod-0")
    learner.learn_one({"a": 1.0, "b": 0.0}, True)
    assert svc.snapshot() == 0
    assert svc.snapshots is not None
    path = svc.snapshots.path("risk", "online")
    before = path.read_bytes()

    from stream_infer.online import snapshots

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(snapshots.os, "fsync", full)
    learner.learn_one({"a": 2.0, "b": 0.0}, False)
    assert svc.snapshot() == 1  # logged and counted, not raised
    assert _value(svc, "stream_infer_learning_errors_total", {"stage": "snapshot"}) == 1
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary left


def test_a_housekeeping_failure_is_counted_and_learning_goes_on(
    stoppers: list[LearningService], caplog: pytest.LogCaptureFixture
) -> None:
    svc, learner = service(topology())

    def broken(owned: object = None) -> int:
        raise RuntimeError("a bug in expiry")

    svc.loop.joiner.expire = broken  # type: ignore[method-assign]
    stoppers.append(svc)
    svc.start()
    assert wait_for(
        lambda: _value(svc, "stream_infer_learning_errors_total", {"stage": "housekeeping"}) >= 1
    )
    assert submit_in_thread(svc, 10).wait(5.0)
    assert wait_for(lambda: learner.n_learned == 10)
    assert svc.alive
    assert "housekeeping failed" in caplog.text


def test_submit_never_blocks_on_a_learning_thread_that_is_not_running() -> None:
    svc, _ = service(topology(), queue_size=2)  # never started: as good as dead
    done = submit_in_thread(svc, 20)
    assert done.wait(2.0), "submit() blocked on a full queue nobody drains"
    assert _value(svc, "stream_infer_learning_dropped_total", {"kind": "scored"}) == 20
    assert _value(svc, "stream_infer_learning_dropped_total", {"kind": "labels"}) == 20
    assert _value(svc, "stream_infer_labels_lost_total", {"cause": "dropped"}) == 20
    assert svc.problem == "the online learning thread stopped: nothing more is learned"


class StuckLearner(OnlineLearner):
    """A learner whose learn_one hangs until released (a river call that never returns)."""

    def __init__(self) -> None:
        super().__init__("risk", "online", ("a", "b"))
        self.release = threading.Event()

    def learn_one(self, x: Any, y: bool) -> None:
        self.release.wait(10)
        super().learn_one(x, y)


def test_a_stuck_learning_thread_drops_after_the_wait_and_is_a_health_problem(
    stoppers: list[LearningService],
) -> None:
    learner = StuckLearner()
    svc, _ = service(topology(), learner, queue_size=2, queue_wait_s=0.05, stall_s=0.2)
    stoppers.append(svc)
    svc.start()
    started = time.monotonic()
    assert submit_in_thread(svc, 10).wait(5.0)
    # 10 batches of 2 items behind a queue of 2: most waited 0.05 s and were dropped.
    assert time.monotonic() - started < 3.0
    dropped = _value(svc, "stream_infer_learning_dropped_total", {"kind": "labels"})
    assert dropped >= 5
    assert wait_for(lambda: svc.problem is not None, 3.0)
    assert "has taken no item for" in str(svc.problem)
    learner.release.set()
    assert wait_for(lambda: svc.problem is None, 3.0)


def test_the_runtime_reports_a_stuck_learning_thread_in_healthz() -> None:
    from stream_infer.runtime.worker import InferenceRuntime

    rt = InferenceRuntime(topology())
    learning = rt.learning
    assert learning is not None
    learner = StuckLearner()
    rt.models.predictors[("risk", "online")] = learner
    learning.queue_wait_s, learning.stall_s = 0.05, 0.2
    try:
        rt.ready = True
        learning.start()
        assert submit_in_thread(learning, 10).wait(5.0)
        assert wait_for(lambda: bool(rt.health_problems()), 3.0)
        (problem,) = rt.health_problems()
        assert problem.startswith("the online learning thread has taken no item for"), problem
    finally:
        learner.release.set()
        learning._stop.set()
        learning._thread.join(5)
        rt.threads.inference.shutdown(wait=False)
        rt.threads.loader.shutdown(wait=False)
        rt.models.watchdog.close()


# --- item 13: lost joins are measured -----------------------------------------------------


def test_joins_lost_to_a_rebalance_and_orphaned_labels_are_counted() -> None:
    svc, learner = service(topology())
    now = [0.0]
    svc.loop.joiner = LabelJoiner(10.0, 100, clock=lambda: now[0])
    # Events of partitions 0 and 1 were served here; then partition 1 moved to another worker.
    svc._on_scored(batch_of(["e0", "e1"]), scored(["e0", "e1"]), [0, 1])
    svc.assigned([0])
    # A label whose event this worker never saw (served before a restart, or elsewhere).
    svc._on_labels(labels(["orphan"]))
    now[0] = 11.0
    svc._housekeeping()
    assert _value(svc, "stream_infer_labels_lost_total", {"cause": "rebalance"}) == 1
    assert _value(svc, "stream_infer_labels_lost_total", {"cause": "orphan"}) == 1
    assert _value(svc, "stream_infer_labels_missed_total") == 2  # both events, as before
    assert learner.n_learned == 0


# --- hardening item 16: the operator's own traffic change is not drift --------------------------


def test_a_routing_change_restarts_the_changed_models_monitors_only(
    stoppers: list[LearningService],
) -> None:
    topo = topology(
        monitors=[{"signal": "error"}, {"signal": "prediction"}, {"signal": "feature:a"}]
    )
    svc, _ = service(topo)
    stoppers.append(svc)
    error = svc.loop.monitors_for("risk", "v1", "error")[0]
    prediction = svc.loop.monitors_for("risk", "v1", "prediction")[0]
    feature = svc.loop.monitors_for("*", "*", "feature:a")[0]
    other = svc.loop.monitors_for("fraud", "v1", "error")[0]
    before = {m: m._adwin for m in (error, prediction, feature, other)}  # kept alive: no id reuse
    svc.start()
    svc.serving_changed({"risk"})
    assert wait_for(lambda: error._adwin is not before[error])
    assert wait_for(lambda: prediction._adwin is not before[prediction])
    assert feature._adwin is before[feature], "what serves does not change the input"
    assert other._adwin is before[other], "another model's routing did not change"


def test_a_routing_change_before_the_thread_starts_is_not_counted_as_dropped() -> None:
    svc, _ = service(topology(monitors=[{"signal": "error"}]))
    svc.serving_changed({"risk"})
    assert _value(svc, "stream_infer_learning_dropped_total", {"kind": "routing"}) == 0.0


def test_labels_that_are_not_labels_become_dead_letters_of_their_batch(
    validators: dict[str, Any],
) -> None:
    """Decoded on the inference thread: an invalid label's dead letter goes out under its
    batch's ticket (it was produced from the learning thread, so the label's offset could be
    committed before its dead letter was delivered)."""
    svc, _ = service(topology())
    good = label_records(["e-1"])
    bad = [
        FakeRecord(b"{not json", b"k", topic="labels", partition=0, offset=7),
        FakeRecord(orjson.dumps({"id": "e-2", "label": "yes"}), b"k", topic="labels"),
    ]
    decoded, dead = svc.split_labels([*good, *bad])
    assert decoded == [("e-1", 1.0)]
    assert [d.reason for d in dead] == ["invalid_label", "invalid_label"]
    assert [d.record for d in dead] == bad
    assert _value(svc, "stream_infer_labels_total", {"status": "invalid"}) == 2.0
    from stream_infer.core.serde import encode_dead_letter

    for letter in dead:
        validators["dead-letter"].validate(orjson.loads(encode_dead_letter(letter)))
