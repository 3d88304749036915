"""The bench's workloads (issue 16 items 2 and 3): the models built by bench/workloads.py load
as the worker loads them, the run's topology carries the workload's features and model, its
events pass the worker's decoder and malformed ones are refused with the production reasons,
and the feature sweep's tables and plot are computed from a results dict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import torch

from bench import features, systems, workloads
from bench.events import EventPool, events_for, pool_for
from bench.plan import FULL, PARTS, QUICK
from stream_infer.core.serde import FeatureDecoder
from stream_infer.inference.predictor import TorchPredictor
from stream_infer.inference.store import ModelMeta
from stream_infer.validation import topology_problems


class FakeRecord:
    def __init__(self, value: bytes, key: bytes = b"k") -> None:
        self._value, self._key = value, key

    def value(self) -> bytes:
        return self._value

    def key(self) -> bytes:
        return self._key

    def topic(self) -> str:
        return "in"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return 0


def _load(directory: Path, w: workloads.Workload) -> TorchPredictor:
    _meta, predictor = TorchPredictor.load(
        directory, model="risk", version="v1", features=w.features, device=torch.device("cpu")
    )
    return predictor


@pytest.mark.parametrize(
    "workload",
    [workloads.HEAVY, workloads.FEATURES_64, workloads.FEATURES_256],
    ids=lambda w: w.key,
)
def test_built_artifacts_load_as_the_worker_loads_them(
    workload: workloads.Workload, tmp_path: Path
) -> None:
    directory = workloads.artifact_dir(workload, tmp_path)
    meta = ModelMeta.read(directory)
    assert meta.format == "export"
    assert meta.features == workload.features
    predictor = _load(directory, workload)
    predictor.warm_up()
    x = np.random.default_rng(0).standard_normal((5, workload.n_features)).astype(np.float32)
    out = predictor.predict_many(x)
    assert out.shape == (5,)
    assert ((out > 0) & (out < 1)).all()  # a logit through the sigmoid
    # Deterministic: the same seed builds the same bytes; the second call finds the first.
    again = workloads.artifact_dir(workload, tmp_path / "other")
    assert ModelMeta.read(again).sha256 == meta.sha256
    assert workloads.artifact_dir(workload, tmp_path) == directory


def test_a_corrupt_cached_artifact_is_built_again(tmp_path: Path) -> None:
    w = workloads.FEATURES_9
    directory = workloads.artifact_dir(w, tmp_path)
    good = ModelMeta.read(directory).sha256
    (directory / "model.pt2").write_bytes(b"not a model")
    assert workloads.artifact_dir(w, tmp_path) == directory
    assert ModelMeta.read(directory).sha256 == good
    assert _load(directory, w).predict_many(np.zeros((2, 9), np.float32)).shape == (2,)


def test_the_architectures_are_the_issues() -> None:
    assert workloads.SMALL.architecture == "MLP 9-16-16-1"
    assert workloads.SMALL.shipped is not None and workloads.SMALL.is_base
    assert workloads.HEAVY.features == workloads.SMALL.features
    assert workloads.HEAVY.architecture == "MLP 9-2048-2048-1"
    assert [w.n_features for w in workloads.FEATURE_SWEEP] == [9, 64, 256, 9]
    assert workloads.FEATURES_9_PADDED.event_padding > 0
    assert workloads.FEATURES_64.n_parameters == 64 * 16 + 16 + 16 * 16 + 16 + 16 + 1


def _topology(tmp_path: Path, workload: workloads.Workload | None) -> Any:
    kwargs = {} if workload is None else {"workload": workload}
    _path, topo = systems.write_topology(
        tmp_path,
        run_id="t",
        bootstrap_servers="127.0.0.1:9",
        session_timeout_ms=6000,
        batching={},
        **kwargs,
    )
    return topo


def test_the_default_topology_is_the_shipped_one(tmp_path: Path) -> None:
    topo = _topology(tmp_path, None)
    (model,) = topo.models
    assert [v.version for v in model.versions] == ["v1", "v2"]
    assert model.versions[0].path == workloads.SMALL_ARTIFACT
    assert topo.features == workloads.SMALL.features


def test_a_workloads_topology_serves_its_model_on_its_features(tmp_path: Path) -> None:
    w = workloads.FEATURES_256
    topo = _topology(tmp_path, w)
    assert topo.features == w.features
    (model,) = topo.models
    assert model.name == "risk" and model.serving == "v1"
    (version,) = model.versions
    assert version.path == workloads.artifact_dir(w)
    assert topology_problems(topo) == []  # the worker's own start-up check
    assert not topo.online.enabled  # no learner: nothing reads labels of synthetic features


def test_feature_events_pass_the_workers_decoder_and_bad_ones_are_refused(tmp_path: Path) -> None:
    w = workloads.FEATURES_64
    topo = _topology(tmp_path, w)
    decoder = FeatureDecoder(topo.features, topo.limits.max_event_bytes)  # as InferenceStep
    pool = EventPool(topo, size=50)
    good = [v for _k, v in list(_take(pool, 50))]
    doc = orjson.loads(good[0])
    assert sorted(doc["features"]) == sorted(w.features)
    missing = orjson.loads(good[1])
    del missing["features"]["feat_010"]
    wrong_type = orjson.loads(good[2])
    wrong_type["features"]["feat_000"] = "1.5"
    small_event = next(_take(pool_for(_topology(tmp_path / "s", workloads.SMALL)), 1))[1]
    records = [FakeRecord(v) for v in good[3:]] + [
        FakeRecord(orjson.dumps(missing)),
        FakeRecord(orjson.dumps(wrong_type)),
        FakeRecord(small_event),
    ]
    batch, dead = decoder.decode_batch(records)
    assert len(batch) == 47
    assert batch.x.shape == (47, 64)
    assert [d.reason for d in dead] == [
        "missing_feature",
        "invalid_feature_type",
        "missing_feature",
    ]
    predictor = _load(workloads.artifact_dir(w), w)
    assert predictor.predict_many(batch.x).shape == (47,)


def test_padded_events_are_bigger_and_decode_to_the_same_features(tmp_path: Path) -> None:
    w = workloads.FEATURES_9_PADDED
    topo = _topology(tmp_path, w)
    plain = EventPool(topo, size=20)
    padded = EventPool(topo, size=20, padding=w.event_padding)
    assert padded.mean_event_bytes(20) - plain.mean_event_bytes(20) == pytest.approx(
        w.event_padding + len(',"context":""'), abs=1
    )
    decoder = FeatureDecoder(topo.features, topo.limits.max_event_bytes)
    (_k1, a), (_k2, b) = next(_take(plain, 1)), next(_take(padded, 1))
    assert decoder.decode_one(a)[1] == decoder.decode_one(b)[1]
    assert len(b) <= topo.limits.max_event_bytes
    # A run picks the shared pool only for the shipped features without padding.
    shared = pool_for(_topology(tmp_path / "s", workloads.SMALL))
    heavy = _topology(tmp_path / "h", workloads.HEAVY)
    assert events_for(shared, heavy) is shared
    assert events_for(shared, topo, w.event_padding).padding == w.event_padding


def _take(pool: EventPool, n: int) -> Any:
    it = pool.stamped(5)
    return (next(it) for _ in range(n))


def test_the_parts_and_plans() -> None:
    assert "models" in PARTS and "features" in PARTS
    assert QUICK.features_events < FULL.features_events
    assert QUICK.features_max_bytes < FULL.features_max_bytes


def _results() -> dict[str, Any]:
    def sat(eps: float, cpu: float) -> dict[str, Any]:
        return {"saturation": {"throughput_eps": eps, "cpu_s_per_1k": cpu}, "peak_rss_bytes": 1}

    points = [
        {
            "workload": "features-9",
            "n_features": 9,
            "event_padding": 0,
            "mean_event_bytes": 331.0,
            "events": 1000,
            "systems": {
                "ceiling": sat(40_000, 0.010),
                "stream-infer": {
                    "saturation": {
                        "throughput_eps": 30_000,
                        "cpu_s_per_1k": 0.025,
                        "window_s": 4.0,
                        "stages": {
                            "processing": {"count": 200, "mean_ms": 10.0},
                            "model": {"count": 200, "mean_ms": 2.0},
                        },
                    }
                },
            },
        },
        {
            "workload": "features-256",
            "n_features": 256,
            "event_padding": 0,
            "mean_event_bytes": 7897.0,
            "events": 1000,
            "systems": {"ceiling": sat(8_000, 0.100), "stream-infer": {"error": "it died\nlog"}},
        },
        {
            "workload": "features-9-padded",
            "n_features": 9,
            "event_padding": 7500,
            "mean_event_bytes": 7844.0,
            "events": 1000,
            "systems": {"ceiling": sat(20_000, 0.040), "stream-infer": sat(15_000, 0.060)},
        },
    ]
    forward = {
        "batches": {"1": {"median_ms": 0.9}, "256": {"median_ms": 25.0, "per_event_us": 97.6}}
    }
    return {
        "features": {"points": points},
        "workloads": {"heavy": {"architecture": "MLP 9-2048-2048-1", "forward": forward}},
    }


def test_the_feature_table_is_computed_from_the_results() -> None:
    md = "\n".join(features.markdown_lines(_results()))
    row9 = next(line for line in md.splitlines() if line.startswith("| 9 |"))
    # stream-infer / ceiling: 30,000 / 40,000 and 0.025 / 0.010
    # busy: 200 batches x 10 ms (model 2 ms) over a 4 s window
    assert "| 40,000 | 0.010 | 30,000 | 0.025 | 50% (10%) | 0.75x | 2.50x |" in row9
    assert "| 331 |" in row9
    row256 = next(line for line in md.splitlines() if line.startswith("| 256 |"))
    assert row256.endswith("| 8,000 | 0.100 | - | - | - (-) | - | - |")
    assert "| 9 + 7,500 B padding | 7,844 |" in md
    assert "features-256 stream-infer: it died" in md
    assert "| heavy | MLP 9-2048-2048-1 |" in md and "| 0.900 | 25.00 | 97.60 |" in md
    assert "cpu_vs_features.png" in md
    assert features.markdown_lines({}) == []


def test_the_plot_is_drawn_from_the_results(tmp_path: Path) -> None:
    path = tmp_path / "cpu_vs_features.png"
    assert features.plot(_results(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not features.plot({"features": {"points": []}}, tmp_path / "none.png")


def test_the_report_includes_the_feature_sweep(tmp_path: Path) -> None:
    from bench import report

    results = _results() | {"systems": {}, "runs": [], "machine": {}}
    written = report.write_all(results, tmp_path)
    assert tmp_path / "cpu_vs_features.png" in written
    assert "## CPU against the feature count" in (tmp_path / "RESULTS.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["features"]["points"]
