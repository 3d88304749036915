"""The control plane inside a worker, without a broker (issue 13 items 2, 9, 18): a version that
cannot be loaded, moved or warmed up never escapes the loader; the routing table is the same on
workers that can and cannot load a version; a worker serves only routings the log names; what
no routing needs is unloaded; replay loads only the routing the log ends with."""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import torch
from jsonschema import Draft202012Validator

from stream_infer.core.control import encode_ack
from stream_infer.core.routing import Route
from stream_infer.inference import predictor as predictor_module
from stream_infer.inference.store import ModelMeta, save_export, sha256_file
from stream_infer.runtime.worker import InferenceRuntime
from stream_infer.settings import parse_topology
from tests.unit.test_control_log import FakeMessage

FEATURES = ("a", "b")
ROOT = Path(__file__).resolve().parents[2]


class _Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.layer(x))


def good_artifact(path: Path) -> Path:
    save_export(_Linear(), path, features=FEATURES, output="probability")
    return path


def static_batch_artifact(path: Path) -> Path:
    """A valid artifact whose program only takes batches of 2: it loads, warm-up raises."""
    path.mkdir(parents=True)
    program = torch.export.export(_Linear().eval(), (torch.zeros(2, 2),))
    torch.export.save(program, str(path / "model.pt2"))
    sha = sha256_file(path / "model.pt2")
    ModelMeta("export", "model.pt2", sha, FEATURES, "probability").write(path)
    return path


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("artifacts")
    return {
        "good": good_artifact(root / "good"),
        "good2": good_artifact(root / "good2"),
        "static": static_batch_artifact(root / "static"),
    }


def runtime_with(paths: dict[str, Path]) -> InferenceRuntime:
    topics = {"input": "in", "predictions": "out", "dead_letter": "dlq", "control": "ctl"}
    versions = [{"version": v, "path": str(p)} for v, p in paths.items()]
    doc: dict[str, Any] = {
        "name": "t",
        "topics": topics,
        "features": list(FEATURES),
        "device": "cpu",
        "models": [{"name": "risk", "serving": "v1", "versions": versions}],
    }
    return InferenceRuntime(parse_topology(doc, env={}))


@pytest.fixture
def runtimes() -> Iterator[list[InferenceRuntime]]:
    made: list[InferenceRuntime] = []
    yield made
    for rt in made:
        rt.threads.inference.shutdown(wait=False)
        rt.threads.loader.shutdown(wait=False)
        rt.models.watchdog.close()


def cmd(i: int, command: str, **fields: Any) -> bytes:
    return orjson.dumps({"id": f"c{i}", "command": command, "model": "risk", **fields})


def start(rt: InferenceRuntime, log: list[bytes]) -> None:
    """What _prepare does once the control log is read: rebuild, then load what it names."""
    rt.control.rebuild([FakeMessage(i, raw) for i, raw in enumerate(log)])


def served(rt: InferenceRuntime) -> dict[str, Route]:
    return dict(rt.models.snapshot.routes)


def test_a_version_that_fails_warm_up_is_applied_not_loaded_and_nothing_escapes(
    artifacts: dict[str, Path], runtimes: list[InferenceRuntime]
) -> None:
    rt = runtime_with({"v1": artifacts["good"], "v2": artifacts["static"]})
    runtimes.append(rt)
    start(rt, [])
    rt.ready = True
    command, error = rt.control.apply(cmd(1, "swap", version="v2"))
    assert command is not None and error is None
    assert rt.control.table.routes["risk"] == Route.single("v2"), "the table is what the log says"
    assert served(rt) == {"risk": Route.single("v1")}, "the last routing that loaded serves"
    assert rt.not_ready_reason is not None and "risk:v2" in rt.not_ready_reason
    assert "warm" in rt.not_ready_reason or "shape" in rt.not_ready_reason.lower()
    schema = json.loads((ROOT / "schemas" / "control-ack.schema.json").read_text())
    ack = orjson.loads(
        encode_ack(
            command_id="c1",
            command="swap",
            worker="w",
            table=rt.control.table,
            error=None,
            now=0.0,
            not_loaded=rt.models.problem,
            serving=rt.models.snapshot.routes,
        )
    )
    Draft202012Validator(schema).validate(ack)
    assert (ack["status"], ack["reason"]) == ("applied_not_loaded", "artifact_invalid")
    assert ack["serving"] == {"risk": {"weights": {"v1": 1.0}, "shadow": None}}


def test_out_of_device_memory_on_moving_a_version_is_applied_not_loaded(
    artifacts: dict[str, Path], runtimes: list[InferenceRuntime], monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = runtime_with({"v1": artifacts["good"], "v2": artifacts["good2"]})
    runtimes.append(rt)
    start(rt, [])
    real_init = predictor_module.TorchPredictor.__init__

    def to_device(self: Any, module: torch.nn.Module, **kwargs: Any) -> None:
        if kwargs["version"] == "v2":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        real_init(self, module, **kwargs)

    monkeypatch.setattr(predictor_module.TorchPredictor, "__init__", to_device)
    _command, error = rt.control.apply(cmd(1, "swap", version="v2"))
    assert error is None
    assert rt.models.problem is not None and "out of memory" in rt.models.problem
    assert served(rt) == {"risk": Route.single("v1")}
    # v1 still resident may be why v2 does not fit: retrying beside it may never succeed, a
    # restart (which loads only what the log names) would. /healthz says so.
    assert any("out of memory" in p and "a restart" in p for p in rt.health_problems())


def test_replay_never_raises_and_loads_only_the_routing_the_log_ends_with(
    artifacts: dict[str, Path], runtimes: list[InferenceRuntime]
) -> None:
    rt = runtime_with(
        {"v1": artifacts["good"], "v2": artifacts["static"], "v3": artifacts["good2"]}
    )
    runtimes.append(rt)
    start(rt, [cmd(1, "swap", version="v2"), cmd(2, "swap", version="v3")])
    assert rt.models.problem is None
    assert served(rt) == {"risk": Route.single("v3")}
    assert set(rt.models.predictors) == {("risk", "v3")}, "v1 and v2 were never needed"


def test_workers_with_and_without_an_artifact_hold_the_same_routing(
    artifacts: dict[str, Path], runtimes: list[InferenceRuntime], tmp_path: Path
) -> None:
    paths = {"v1": artifacts["good"], "v2": artifacts["good2"], "v3": artifacts["good"]}
    has_all = runtime_with(paths)
    misses_v2 = runtime_with(paths | {"v2": tmp_path / "deleted"})
    runtimes += [has_all, misses_v2]
    log = [cmd(1, "swap", version="v2"), cmd(2, "swap", version="v3"), cmd(3, "rollback")]
    for rt in (has_all, misses_v2):
        start(rt, [])
        for raw in log:
            assert rt.control.apply(raw)[1] is None
    assert (
        has_all.control.table.routes
        == misses_v2.control.table.routes
        == {"risk": Route.single("v2")}
    )
    assert served(has_all) == {"risk": Route.single("v2")} and has_all.models.problem is None
    assert served(misses_v2) == {"risk": Route.single("v3")}, "its last routing that loaded"
    assert misses_v2.models.problem is not None and "risk:v2" in misses_v2.models.problem


def test_a_worker_that_cannot_load_the_logs_routing_at_start_serves_nothing_until_it_can(
    artifacts: dict[str, Path], runtimes: list[InferenceRuntime], tmp_path: Path
) -> None:
    late = tmp_path / "v2-late"
    rt = runtime_with({"v1": artifacts["good"], "v2": late})
    runtimes.append(rt)
    start(rt, [cmd(1, "swap", version="v2")])
    assert served(rt) == {}, "never the topology's v1: the log says v2"
    assert rt.models.problem is not None and "risk:v2" in rt.models.problem
    assert not rt.models.serves
    assert rt.control.load() is not None  # a retry while the artifact is still missing
    shutil.copytree(artifacts["good"], late)
    assert rt.control.load() is None
    assert (
        served(rt) == {"risk": Route.single("v2")}
        and rt.models.serves
        and rt.models.problem is None
    )


def test_versions_no_routing_needs_are_unloaded(
    artifacts: dict[str, Path], runtimes: list[InferenceRuntime]
) -> None:
    rt = runtime_with({"v1": artifacts["good"], "v2": artifacts["good2"], "v3": artifacts["good"]})
    runtimes.append(rt)
    start(rt, [])
    assert set(rt.models.predictors) == {("risk", "v1")}
    rt.control.apply(cmd(1, "swap", version="v2"))
    assert set(rt.models.predictors) == {("risk", "v2")}
    rt.control.apply(cmd(2, "shadow", version="v3"))
    assert set(rt.models.predictors) == {("risk", "v2"), ("risk", "v3")}
    rt.control.apply(cmd(3, "unshadow"))
    assert set(rt.models.predictors) == {("risk", "v2")}


def test_readiness_says_why(artifacts: dict[str, Path], runtimes: list[InferenceRuntime]) -> None:
    rt = runtime_with({"v1": artifacts["good"], "v2": artifacts["static"]})
    runtimes.append(rt)
    start(rt, [])
    assert rt.not_ready_reason == "starting or stopping"
    rt.ready = True
    assert rt.not_ready_reason is None
    rt.control.apply(cmd(1, "swap", version="v2"))
    assert rt.not_ready_reason is not None and rt.not_ready_reason.startswith("risk:v2")


# --- the replay at start: one line, no count (issue 18) -----------------------------------------


def commands_counted(rt: InferenceRuntime, command: str, status: str) -> float:
    value = rt.metrics.registry.get_sample_value(
        "stream_infer_control_commands_total", {"command": command, "status": status}
    )
    return value or 0.0


def test_the_replay_logs_one_summary_line_and_counts_nothing(
    artifacts: dict[str, Path], runtimes: list[InferenceRuntime], caplog: pytest.LogCaptureFixture
) -> None:
    """Every start replays the whole log: a warning per command ever rejected, and a counter
    that jumps by the log's length, made every restart look like a burst of rejections."""
    rt = runtime_with({"v1": artifacts["good"], "v2": artifacts["good2"]})
    runtimes.append(rt)
    caplog.set_level(logging.DEBUG, logger="stream_infer.runtime.control_plane")
    log = [
        cmd(1, "swap", version="v2"),
        cmd(2, "swap", version="v9"),  # unknown_version
        cmd(1, "swap", version="v2"),  # duplicate_command
        cmd(3, "rollback"),
        cmd(3, "rollback"),  # duplicate_command
    ]
    start(rt, log)
    ours = [r for r in caplog.records if r.name == "stream_infer.runtime.control_plane"]
    [line] = [r for r in ours if r.levelno >= logging.INFO]
    assert line.levelno == logging.INFO
    assert re.fullmatch(
        r"replayed 5 control commands up to offset 4 in \d+\.\d s: 2 applied, 3 rejected "
        r"\(2 duplicate_command, 1 unknown_version\); routing "
        + re.escape(str({"risk": {"weights": {"v1": 1.0}, "shadow": None}})),
        line.getMessage(),
    ), line.getMessage()
    assert len([r for r in ours if r.levelno == logging.DEBUG]) == 5, "each command at DEBUG"
    for command, status in (("swap", "applied"), ("swap", "rejected"), ("rollback", "applied")):
        assert commands_counted(rt, command, status) == 0.0, (command, status)

    # Live commands keep their own lines and are counted.
    caplog.clear()
    assert rt.control.apply(cmd(4, "swap", version="v2"))[1] is None
    assert rt.control.apply(cmd(4, "swap", version="v2"))[1] is not None
    levels = [(r.levelno, r.getMessage()[:22]) for r in caplog.records if r.levelno >= logging.INFO]
    assert levels == [
        (logging.INFO, "control command c4 (sw"),
        (logging.WARNING, "control command c4 rej"),
    ]
    assert commands_counted(rt, "swap", "applied") == commands_counted(rt, "swap", "rejected") == 1


def test_an_empty_log_is_summed_up_too(
    artifacts: dict[str, Path], runtimes: list[InferenceRuntime], caplog: pytest.LogCaptureFixture
) -> None:
    rt = runtime_with({"v1": artifacts["good"]})
    runtimes.append(rt)
    caplog.set_level(logging.INFO, logger="stream_infer.runtime.control_plane")
    start(rt, [])
    [line] = caplog.records
    assert line.getMessage().startswith("replayed 0 control commands in ")
    assert ": 0 applied, 0 rejected; routing {'risk': " in line.getMessage()


def test_the_predictors_are_replaced_not_changed_in_place(
    artifacts: dict[str, Path], runtimes: list[InferenceRuntime]
) -> None:
    """The learning thread iterates them while the loader thread loads and unloads: a dict
    changed in place under it raises 'dictionary changed size during iteration'."""
    rt = runtime_with({"v1": artifacts["good"], "v2": artifacts["good2"]})
    runtimes.append(rt)
    start(rt, [])
    seen = rt.models.predictors
    rt.control.apply(cmd(1, "shadow", version="v2"))  # a load
    assert set(seen) == {("risk", "v1")}
    seen = rt.models.predictors
    rt.control.apply(cmd(2, "swap", version="v2"))  # an unload
    assert set(seen) == {("risk", "v1"), ("risk", "v2")}
    assert set(rt.models.predictors) == {("risk", "v2")}


def test_a_reset_of_a_learner_this_worker_lacks_is_in_its_table_and_refused_in_its_ack(
    artifacts: dict[str, Path], runtimes: list[InferenceRuntime]
) -> None:
    """The table applies a reset of any declared version alike on every worker (the generation
    a later command's if_generation names means the same everywhere); this worker, which runs
    no learner for it, says not_a_learner in its ack."""
    rt = runtime_with({"v1": artifacts["good"], "v2": artifacts["good"]})
    runtimes.append(rt)
    start(rt, [])
    before = rt.control.table.generation
    _command, error = rt.control.apply(cmd(1, "reset_learner", version="v2"))
    assert error is not None and error.reason == "not_a_learner"
    assert rt.control.table.generation == before + 1
    counted = rt.metrics.control_commands.labels("reset_learner", "applied")
    assert counted._value.get() == 1  # in the table, as on every worker
