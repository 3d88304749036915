"""The bench's exactly_once variant (issue 15): the transaction figures read from two /metrics
scrapes, the topology it runs, the read_committed reader, and the issue's targets computed from
a results dict (met, missed, and which part costs the most)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import cli, report, systems
from bench.plan import PARTS, QUICK
from bench.reader import reader_config
from bench.stages import combine, parse_metrics, transactions
from stream_infer.observability import Metrics


def test_two_scrapes_give_each_transaction_stage_the_commit_and_the_outcomes() -> None:
    metrics = Metrics()
    metrics.transaction_seconds.labels("commit").observe(0.5)  # before the window
    metrics.transactions.labels("committed").inc()
    before = parse_metrics(metrics.exposition().decode())
    for _ in range(100):
        metrics.transaction_seconds.labels("begin").observe(0.0002)
        metrics.transaction_seconds.labels("produce").observe(0.001)
        metrics.transaction_seconds.labels("send_offsets").observe(0.003)
        metrics.transaction_seconds.labels("commit").observe(0.004)
    metrics.transaction_seconds.labels("abort").observe(0.002)
    metrics.transactions.labels("committed").inc(100)
    metrics.transactions.labels("aborted").inc()
    metrics.transactions.labels("skipped").inc(2)
    after = parse_metrics(metrics.exposition().decode())

    assert 'stream_infer_transaction_seconds{stage="commit"}' in after.histograms
    assert after.counters['stream_infer_transactions_total{outcome="committed"}'] == 101.0
    txn = transactions(before, after)
    assert txn["outcomes"] == {"committed": 100, "aborted": 1, "skipped": 2}
    commit = txn["stages"]["commit"]
    assert commit["count"] == 100  # the 0.5 s before the window is not in it
    assert commit["mean_ms"] == pytest.approx(4.0)
    assert commit["p99_bucket_ms"][0] < 4.0 <= commit["p99_bucket_ms"][1]
    assert txn["stages"]["abort"]["count"] == 1
    # the commit = send_offsets + commit; whole = begin + produce + send_offsets + commit
    assert txn["commit"]["mean_ms"] == pytest.approx(7.0)
    assert txn["commit"]["p99_ms"] == pytest.approx(
        txn["stages"]["send_offsets"]["p99_ms"] + commit["p99_ms"]
    )
    assert txn["whole"]["mean_ms"] == pytest.approx(8.2)
    assert txn["busy_s"] == pytest.approx(100 * 0.0082 + 0.002)


def test_an_at_least_once_worker_has_no_transaction_figures() -> None:
    metrics = Metrics()
    metrics.queue_wait_seconds.observe(0.01)
    scraped = parse_metrics(metrics.exposition().decode())
    assert transactions(None, scraped) == {}
    # a stage never observed: the combination is unknown, not zero
    assert (
        combine(
            {"commit": {"count": 3, "mean_ms": 1.0, "p50_ms": 1.0, "p99_ms": 2.0}},
            (
                "send_offsets",
                "commit",
            ),
        )["p99_ms"]
        is None
    )


def test_the_variant_runs_exactly_once_with_its_own_in_flight_default(tmp_path: Path) -> None:
    spec = systems.STREAM_INFER_EXACTLY_ONCE
    assert spec.kind == "stream-infer" and spec.batching == {}
    _, topo = systems.write_topology(
        tmp_path,
        run_id="eos",
        bootstrap_servers="127.0.0.1:9092",
        session_timeout_ms=6000,
        batching=spec.batching,
        guarantee=spec.guarantee,
    )
    assert topo.processing.exactly_once
    b = topo.batching
    assert (b.max_batch_size, b.max_wait_ms, b.max_batches_in_flight) == (512, 10.0, 2)
    _, alo = systems.write_topology(
        tmp_path, run_id="alo", bootstrap_servers="x:1", session_timeout_ms=6000, batching={}
    )
    assert not alo.processing.exactly_once and alo.batching.max_batches_in_flight == 4


def test_the_reader_reads_committed_records_only() -> None:
    conf = reader_config("127.0.0.1:9092")
    assert conf["isolation.level"] == "read_committed"
    assert conf["enable.auto.commit"] is False


def test_the_part_is_named_and_skipped_on_tansu() -> None:
    assert "exactly-once" in PARTS
    results: dict[str, Any] = {"systems": {}}
    plan = QUICK
    on_kafka = cli._steps(None, plan, ["stream-infer", "exactly-once"], results, engine="kafka")
    assert [name for name, _ in on_kafka] == ["stream-infer", "exactly-once"]
    on_tansu = cli._steps(None, plan, ["exactly-once"], results, engine="tansu")
    assert on_tansu == []


# --- the targets, from synthetic results ------------------------------------------------------


def _txn(send_offsets_p99: float, commit_p99: float, *, busy: float = 0.0) -> dict[str, Any]:
    def stage(p99: float, total_s: float = 0.0) -> dict[str, Any]:
        return {
            "count": 100,
            "mean_ms": p99 / 2,
            "p50_ms": p99 / 2,
            "p99_ms": p99,
            "total_s": total_s,
        }

    stages = {
        "begin": stage(0.2, 0.01 * busy),
        "produce": stage(1.0, 0.09 * busy),
        "send_offsets": stage(send_offsets_p99, 0.3 * busy),
        "commit": stage(commit_p99, 0.6 * busy),
    }
    return {
        "stages": stages,
        "outcomes": {"committed": 100, "aborted": 0, "skipped": 0},
        "commit": combine(stages, ("send_offsets", "commit")),
        "whole": combine(stages, ("begin", "produce", "send_offsets", "commit")),
        "busy_s": busy,
    }


def _system(
    label: str,
    sat: float,
    p99: float,
    *,
    in_flight: int,
    txn: dict[str, Any] | None = None,
    cpu: float = 0.02,
    processing_total_s: float = 1.0,
) -> dict[str, Any]:
    point: dict[str, Any] = {
        "fraction": 0.5,
        "p50_ms": p99 / 3,
        "p99_ms": p99,
        "stages": {
            "fetch_delay": {"p99_ms": 4.0},
            "batching": {"p99_ms": 9.0},
            "queue_wait": {"p99_ms": 2.0},
            "processing": {"p99_ms": 3.0},
            "out_hop": {"p99_ms": p99 - 10.0},
        },
    }
    saturation: dict[str, Any] = {
        "throughput_eps": sat,
        "events": 200_000,
        "received": 200_000,
        "window_s": 10.0,
        "cpu_s_per_1k": cpu,
        "stages": {"processing": {"count": 400, "mean_ms": processing_total_s * 2.5}},
    }
    if txn is not None:
        point["transactions"] = txn
        saturation["transactions"] = txn
    return {
        "label": label,
        "batching": {
            "max_batch_size": 512,
            "max_wait_ms": 10.0,
            "max_batches_in_flight": in_flight,
        },
        "saturation": saturation,
        "latency": [point],
        "peak_rss_bytes": 800 * 2**20,
    }


def _results(eos_sat: float, eos_p99: float, *, busy: float = 9.0) -> dict[str, Any]:
    return {
        "systems": {
            "stream-infer-default": _system("stream-infer (default)", 70_000.0, 200.0, in_flight=4),
            "stream-infer-exactly-once": _system(
                "stream-infer (exactly_once, default batching)",
                eos_sat,
                eos_p99,
                in_flight=2,
                txn=_txn(6.0, 14.0, busy=busy),
                cpu=0.03,
            ),
        },
        "machine": {"date": "today", "loadavg": [1.0, 1.0, 1.0]},
        "runs": [],
    }


def test_targets_met_are_computed_from_the_results() -> None:
    rows = report.exactly_once_targets(_results(56_000.0, 29.0))
    throughput, latency = rows
    assert throughput["met"] and throughput["ratio"] == pytest.approx(0.8)
    assert throughput["measured"] == "80% (56,000 / 70,000 events/s)"
    # bound: max_wait 10 + the commit's p99 (6 + 14) = 30 ms
    assert latency["met"] and latency["ratio"] == pytest.approx(29.0 / 30.0)
    assert latency["measured"].startswith("29.0 ms vs 30.0 ms = max_wait 10 + commit p99 20.0")


def test_missed_targets_name_the_costliest_part() -> None:
    results = _results(35_000.0, 250.0)
    throughput, latency = report.exactly_once_targets(results)
    assert not throughput["met"] and throughput["ratio"] == pytest.approx(0.5)
    # the transaction thread: 9 s of the 10 s window, more than processing; in it commit
    # (0.6 x 9 s) took the most
    assert (
        "the costliest part: the transaction thread (busy 90% of the saturation window)"
        in throughput["measured"]
    )
    assert "in the transaction thread commit took the most (54%" in throughput["measured"]
    assert "CPU per 1k events 0.030 s vs 0.020 s (1.50x)" in throughput["measured"]
    assert not latency["met"]
    assert (
        "the stage that misses most: out hop (to the reader) (p99 240.0 ms)" in latency["measured"]
    )
    assert "(the largest: commit, 14.0 ms)" in latency["measured"]
    assert (
        "at_least_once's p99 at its 50 %: 200.0 ms (exactly_once +50.0 ms)" in latency["measured"]
    )
    # the inference thread is named when it, not the transaction, took the most time
    busy_inference = _results(35_000.0, 250.0, busy=1.0)
    busy_inference["systems"]["stream-infer-exactly-once"]["saturation"]["stages"] = {
        "processing": {"count": 400, "mean_ms": 20.0}
    }
    row = report.exactly_once_targets(busy_inference)[0]
    assert "the costliest part: the inference thread's processing (busy 80%" in row["measured"]
    assert "the transaction thread busy 10%" in row["measured"]


def test_results_md_puts_both_guarantees_side_by_side() -> None:
    md = report.markdown(_results(35_000.0, 250.0))
    section = md.split("## exactly_once vs at_least_once (issue 15)")[1].split("\n## ")[0]
    assert "| saturation, events/s | 70,000 | 35,000 | 50% |" in section
    assert "| CPU s / 1k events (saturated) | 0.020 | 0.030 | 1.50 |" in section
    assert "| p99 at 50 % of its saturation, ms | 200.0 | 250.0 | 1.25 |" in section
    assert "| 512 / 10 ms / 4 | 512 / 10 ms / 2 |" in section
    assert "| >= 70% of at_least_once's throughput | 50% (35,000 / 70,000 events/s)" in section
    assert "### The transaction's time" in section
    # the commit (send_offsets + commit) at p50 / p99: 3 + 7 / 6 + 14
    assert "| 10.0 / 20.0 |" in section
    # the stage breakdown's note measures exactly_once against its own bound
    assert "misses max_wait + the commit p99 20.0 ms = 30.0 ms" in md
    assert report.exactly_once_targets({"systems": {}}) == []
    assert "issue 15" not in report.markdown({"systems": {}, "runs": []})
