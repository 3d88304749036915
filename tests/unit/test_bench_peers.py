"""The bench's peers part (issue 16): the peers' commands and topology, the alternated rounds'
order, the medians over the rounds, the interdecile rate, and the issue's target ratios
computed from a results dict (met and missed; thresholds per model), shown in RESULTS.md."""

from __future__ import annotations

from array import array
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bench import report, runner, systems
from bench.plan import FULL, PARTS, QUICK
from bench.reader import PhaseStats
from bench.workloads import HEAVY


def _run(system: str, eps: float | None, cpu: float = 0.02, rss: int = 700 << 20) -> dict[str, Any]:
    if eps is None:
        return {"system": system, "workload": "small", "error": "exited with code 1"}
    return {
        "system": system,
        "label": system.upper(),
        "workload": "small",
        "saturation": {"throughput_eps": eps, "cpu_s_per_1k": cpu, "complete": True},
        "peak_rss_bytes": rss,
    }


def _results(small: dict[str, list[float]], heavy: dict[str, list[float]]) -> dict[str, Any]:
    """A results dict with the given per-system throughputs, one list entry per round."""

    def workload(runs: dict[str, list[float]]) -> dict[str, Any]:
        rounds = [
            [
                _run(key, values[i], cpu=0.01 if key == "ceiling" else 0.03)
                for key, values in runs.items()
            ]
            for i in range(len(next(iter(runs.values()))))
        ]
        return {"runs": rounds, "summary": report.summarize_rounds(rounds)}

    return {
        "peers": {"rounds": 3, "workloads": {"small": workload(small), "heavy": workload(heavy)}}
    }


def test_the_peers_run_their_own_module_on_the_run_topology() -> None:
    path = Path("/tmp/run.yaml")
    assert systems.QUIX.commands(path)[0][1:] == ["-m", "bench.peer_quix", str(path)]
    bytewax = systems.BYTEWAX.commands(path)[0]
    assert bytewax[1:4] == ["-m", "bench.peer_bytewax", str(path)]
    assert bytewax[4:] == ["--batching", "flat_map_batch"]
    assert "collect" in systems.BYTEWAX_COLLECT.commands(path)[0]
    assert "3.28.1" in systems.QUIX.label and "per-message" in systems.QUIX.label
    assert "0.21.1" in systems.BYTEWAX.label and "flat_map_batch" in systems.BYTEWAX.label


def test_a_peer_on_the_heavy_workload_reads_the_heavy_model_and_features(tmp_path: Path) -> None:
    spec = replace(systems.QUIX, workload=HEAVY)
    _path, topo = systems.write_topology(
        tmp_path,
        run_id="quix-test",
        bootstrap_servers="127.0.0.1:9092",
        session_timeout_ms=6_000,
        batching=spec.batching,
        workload=spec.workload,
    )
    assert topo.features == HEAVY.features
    version = topo.models[0].version(topo.models[0].serving)
    assert version is not None and "heavy" in str(version.path)
    assert topo.topics.input.startswith("bench.quix-test.")


def test_peers_is_a_part_with_sizes_in_both_plans() -> None:
    assert "peers" in PARTS
    for plan in (FULL, QUICK):
        assert plan.peers_rounds >= 3  # a median of at least three
        assert plan.peers_events_quix < plan.peers_events_fast
        assert plan.peers_heavy_events_quix < plan.peers_heavy_events_fast
        assert set(plan.peers_workloads) == {"small", "heavy"}


def test_each_round_rotates_the_order_and_a_failed_run_does_not_stop_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []

    def fake(_ctx: Any, spec: systems.SystemSpec, n: int) -> dict[str, Any]:
        calls.append(spec.key)
        if spec.key == "quix" and calls.count("quix") == 2:
            raise runner.SystemFailed("quix exited")
        return _run(spec.key, float(n))

    monkeypatch.setattr(runner, "measure_saturation", fake)
    monkeypatch.setattr(runner, "say", lambda _msg: None)
    specs = [systems.CEILING, systems.STREAM_INFER_DEFAULT, systems.QUIX, systems.BYTEWAX]
    events = {"ceiling": 1, "stream-infer-default": 2, "quix": 3, "bytewax": 4}
    rounds = runner.measure_rounds(None, specs, events, 3)  # type: ignore[arg-type]
    c, s, q, b = "ceiling", "stream-infer-default", "quix", "bytewax"
    assert calls == [c, s, q, b, s, q, b, c, q, b, c, s]
    assert [r["system"] for r in rounds[1]] == [s, q, b, c]
    assert rounds[1][1]["error"] == "quix exited"
    summary = report.summarize_rounds(rounds)
    assert summary["quix"]["failed"] == 1 and summary["quix"]["eps"] == [3.0, 3.0]
    assert summary["bytewax"]["median_eps"] == 4.0


def test_the_summary_takes_medians_and_the_largest_rss() -> None:
    rounds = [
        [_run("a", 10_000.0, cpu=0.03, rss=800 << 20)],
        [_run("a", 30_000.0, cpu=0.01, rss=900 << 20)],
        [_run("a", 20_000.0, cpu=0.02, rss=850 << 20)],
        [_run("a", None)],
    ]
    entry = report.summarize_rounds(rounds)["a"]
    assert entry["median_eps"] == 20_000.0  # not the mean of the runs nor the last
    assert entry["median_cpu_s_per_1k"] == pytest.approx(0.02)
    assert entry["peak_rss_bytes"] == 900 << 20
    assert entry["failed"] == 1


def test_the_interdecile_rate_ignores_the_time_before_a_first_burst() -> None:
    stats = PhaseStats()
    # 1,000 arrivals spread evenly over 10 s: 100 per second either way
    stats.recv = array("d", [i / 100 for i in range(1000)])
    assert runner.interdecile_rate(stats) == pytest.approx(100.0, rel=0.02)
    # two bursts of 500, 1 s apart: first-to-last says 1,000/s, the interdecile rate too
    # (the middle 80 % spans the gap); with only one burst there is no spread at all
    stats.recv = array("d", [0.0] * 500 + [1.0] * 500)
    assert runner.interdecile_rate(stats) == pytest.approx(800.0)
    stats.recv = array("d", [5.0] * 100)
    assert runner.interdecile_rate(stats) is None
    stats.recv = array("d", [1.0, 2.0])
    assert runner.interdecile_rate(stats) is None


def test_targets_met_on_every_model() -> None:
    results = _results(
        small={
            "ceiling": [40_000, 42_000, 41_000],
            "stream-infer-default": [35_000, 36_000, 34_000],
            "quix": [5_000, 6_000, 5_500],
            "bytewax": [20_000, 21_000, 22_000],
        },
        heavy={
            "ceiling": [8_000, 8_100, 8_200],
            "stream-infer-default": [7_900, 8_000, 8_100],
            "quix": [1_000, 900, 1_100],
            "bytewax": [5_000, 5_100, 5_200],
        },
    )
    rows = report.peers_targets(results)
    by = {(r["workload"], r["target"].split(" ")[1]): r for r in rows}
    throughput = [r for r in rows if not r["target"].startswith("CPU")]
    assert len(throughput) == 8  # 3 ratios + RSS, on each model
    assert all(r["met"] for r in throughput), [r for r in throughput if not r["met"]]
    # ratios from the medians: 35,000 / 5,500 and 35,000 / 21,000
    assert by[("small", "5x")]["ratio"] == pytest.approx(35_000 / 5_500)
    assert by[("small", "1.5x")]["ratio"] == pytest.approx(35_000 / 21_000)
    assert by[("small", "75%")]["ratio"] == pytest.approx(35_000 / 41_000)
    assert by[("heavy", "90%")]["ratio"] == pytest.approx(8_000 / 8_100)
    # the CPU target is the small model's only; 0.03 / 0.01 = 3x: missed
    cpu = [r for r in rows if r["target"].startswith("CPU")]
    assert [r["workload"] for r in cpu] == ["small"]
    assert cpu[0]["ratio"] == pytest.approx(3.0)
    assert not cpu[0]["met"]


def test_targets_missed_are_reported_with_the_measured_ratio() -> None:
    results = _results(
        small={
            "ceiling": [40_000, 40_000, 40_000],
            "stream-infer-default": [28_000, 29_000, 29_500],
            "quix": [6_000, 6_000, 6_000],
            "bytewax": [25_000, 26_000, 27_000],
        },
        heavy={
            "ceiling": [8_000, 8_000, 8_000],
            "stream-infer-default": [7_000, 7_100, 7_200],
            "quix": [1_000, 1_000, 1_000],
            "bytewax": [5_000, 5_000, 5_000],
        },
    )
    rows = {(r["workload"], r["target"]): r for r in report.peers_targets(results)}
    quix = rows[("small", ">= 5x Quix Streams (per-message)")]
    assert not quix["met"] and quix["ratio"] == pytest.approx(29_000 / 6_000)
    batched = rows[("small", ">= 1.5x the best batched peer")]
    assert not batched["met"] and "BYTEWAX" in batched["measured"]
    assert not rows[("small", ">= 75% of the ceiling")]["met"]  # 72.5 %
    heavy = rows[("heavy", ">= 90% of the ceiling")]
    assert not heavy["met"] and heavy["ratio"] == pytest.approx(7_100 / 8_000)
    assert rows[("small", "CPU per 1k events <= 2x the ceiling's")]["ratio"] == pytest.approx(3.0)
    assert not rows[("small", "CPU per 1k events <= 2x the ceiling's")]["met"]
    assert rows[("small", "peak RSS < 1 GB (every round)")]["met"]


def test_the_best_batched_peer_is_the_fastest_one_measured() -> None:
    results = _results(
        small={
            "stream-infer-default": [30_000, 30_000, 30_000],
            "bytewax": [10_000, 10_000, 10_000],
            "bytewax-collect": [18_000, 18_000, 18_000],
        },
        heavy={"stream-infer-default": [1.0, 1.0, 1.0]},
    )
    (row,) = [r for r in report.peers_targets(results) if "batched" in r["target"]]
    assert row["ratio"] == pytest.approx(30_000 / 18_000) and row["met"]
    assert "BYTEWAX-COLLECT" in row["measured"]


def test_results_md_shows_the_peers_the_targets_and_the_model_cost() -> None:
    results = _results(
        small={
            "ceiling": [40_000, 40_000, 40_000],
            "stream-infer-default": [30_000, 31_000, 32_000],
            "quix": [5_000, None, 5_000],
            "bytewax": [20_000, 20_000, 20_000],
        },
        heavy={
            "ceiling": [8_000, 8_000, 8_000],
            "stream-infer-default": [8_000, 8_000, 8_000],
            "quix": [1_000, 1_000, 1_000],
            "bytewax": [4_000, 4_000, 4_000],
        },
    )
    text = report.markdown(results)
    assert "## stream-infer against the peers (issue 16)" in text
    assert (
        "| small | >= 5x Quix Streams (per-message) | 6.2x (31,000 / 5,000 events/s) | yes |"
        in text
    )
    assert "| heavy | >= 1.5x the best batched peer | 2.00x" in text
    assert "(1 failed)" in text  # the failed Quix run is shown, not hidden
    assert "### Throughput against model cost" in text
    assert "| STREAM-INFER-DEFAULT | 31,000 | 8,000 | 26% |" in text
    # written into results.json too
    assert report.peers_targets(results)
    assert report.peers_targets({}) == [] and report._peers_md({}) == []


def test_throughput_against_model_cost_pairs_each_median_with_the_forward_pass(
    tmp_path: Path,
) -> None:
    results = _results(
        small={"stream-infer-default": [30_000, 31_000, 32_000], "quix": [5_000, 5_000, 5_000]},
        heavy={"stream-infer-default": [8_000, 8_000, 8_000], "quix": [900, 1_000, 1_100]},
    )
    assert report.model_cost_points(results) == {}  # no cost measured: nothing to plot
    assert not report.plot_model_cost(results, tmp_path / "none.png")
    workloads = results["peers"]["workloads"]
    workloads["small"]["cost"] = {"batches": {"1": {"median_ms": 0.09}}}
    workloads["heavy"]["cost"] = {"batches": {"1": {"median_ms": 0.8}}}
    points = report.model_cost_points(results)
    assert points["STREAM-INFER-DEFAULT"] == [(0.09, 31_000.0), (0.8, 8_000.0)]
    assert points["QUIX"] == [(0.09, 5_000.0), (0.8, 1_000.0)]
    assert report.plot_model_cost(results, tmp_path / "cost.png")
    assert (tmp_path / "cost.png").stat().st_size > 0
    assert "throughput_vs_model_cost.png" in report.markdown(results)
