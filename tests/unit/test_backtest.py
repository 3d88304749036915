"""The backtest's pure core (stream_infer.online.backtest) and the command's argument parsing:
no broker, no torch."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream_infer.cli import main
from stream_infer.cli.backtest import parse_duration_s, parse_timestamp_ms, time_range_ms
from stream_infer.errors import ConfigError
from stream_infer.online.backtest import MODEL_OUTPUT_INVALID, QUANTILES, Backtest
from stream_infer.online.prequential import Prequential

ROOT = Path(__file__).resolve().parents[2]


def _stream(seed: int, n: int) -> Any:
    rng = np.random.default_rng(seed)
    ids = [f"e{i}" for i in range(n)]
    x = rng.normal(size=(n, 3)).astype(np.float32)
    ts = (1000.0 + np.sort(rng.uniform(0, 600, n))).tolist()
    labels = (rng.random(n) < 0.4).astype(np.float64)
    cand = np.clip(labels * 0.6 + rng.uniform(0, 0.4, n), 0, 1)  # informative
    inc = rng.uniform(0, 1, n)  # noise
    return ids, x, ts, labels, cand, inc


def _expected(labels: Any, scores: Any) -> dict[str, float]:
    preq = Prequential(1000)
    for y, p in zip(labels.tolist(), scores.tolist(), strict=True):
        preq.update_one(y, p)
    return preq.report()


@pytest.mark.parametrize("labels_first", [False, True])
def test_metrics_are_those_of_scoring_the_joined_events_in_process(labels_first: bool) -> None:
    ids, x, ts, labels, cand, inc = _stream(1, 500)
    bt = Backtest("risk", candidate="v2", incumbent="v1", start_s=1000.0, window_s=60.0)
    labelled = [(i, y) for i, y in zip(ids, labels.tolist(), strict=True)][:400]  # 100 unlabelled
    if labels_first:
        bt.labels_many(labelled)
    for lo in range(0, 500, 128):  # in batches, as the replay hands them over
        sl = slice(lo, lo + 128)
        bt.scored_many(ids[sl], x[sl], ts[sl], cand[sl], inc[sl])
    if not labels_first:
        bt.labels_many(labelled)
    report = bt.report()
    for version, scores in (("v2", cand), ("v1", inc)):
        want = _expected(labels[:400], scores[:400])
        got = report["metrics"][version]
        assert got["n"] == want["n"] == 400
        assert got["accuracy"] == want["accuracy"]
        assert got["roc_auc"] == want["roc_auc"]
        assert got["log_loss"] == pytest.approx(want["log_loss"], rel=1e-12)
    assert report["metrics"]["v2"]["log_loss"] < report["metrics"]["v1"]["log_loss"]
    assert report["difference"]["accuracy"] == pytest.approx(
        report["metrics"]["v2"]["accuracy"] - report["metrics"]["v1"]["accuracy"]
    )
    counts = report["counts"]
    assert counts["events"] == counts["scored_events"] == 500
    assert counts["labels"] == counts["joined"] == 400
    assert counts["unlabeled_events"] == 100 and counts["labels_without_event"] == 0
    # agreement and score differences over every scored event, labelled or not
    agree = ((cand > 0.5) == (inc > 0.5)).mean()
    assert report["agreement"]["rate"] == pytest.approx(agree)
    assert report["agreement"]["n"] == 500
    sd = report["score_difference"]
    assert sd["n"] == 500
    assert sd["mean"] == pytest.approx((cand - inc).mean())
    want_q = np.quantile(cand - inc, QUANTILES)
    assert list(sd["quantiles"].values()) == pytest.approx(want_q.tolist())
    assert list(sd["quantiles"]) == [f"{q:g}" for q in QUANTILES]


def test_windows_follow_event_time_not_arrival_order() -> None:
    ids, x, ts, labels, cand, inc = _stream(2, 300)
    pairs = list(zip(ids, labels.tolist(), strict=True))
    reports = []
    for order in (range(300), reversed(range(300))):
        bt = Backtest("risk", candidate="v2", incumbent="v1", start_s=1000.0, window_s=120.0)
        for i in order:
            bt.scored_many([ids[i]], x[i : i + 1], [ts[i]], cand[i : i + 1], inc[i : i + 1])
        bt.labels_many(pairs)
        reports.append(bt.report()["windows"])
    forward, backward = reports
    assert [w["start_s"] for w in forward["series"]] == [1000.0, 1120.0, 1240.0, 1360.0, 1480.0]
    for a, b in zip(forward["series"], backward["series"], strict=True):
        for version in ("v1", "v2"):
            assert a[version]["n"] == b[version]["n"]
            assert a[version]["accuracy"] == b[version]["accuracy"]
            assert a[version]["log_loss"] == pytest.approx(b[version]["log_loss"])
    # each window holds the labels of the events whose time falls in it
    t = np.asarray(ts)
    for w in forward["series"]:
        inside = (t >= w["start_s"]) & (t < w["start_s"] + 120.0)
        assert w["v2"]["n"] == int(inside.sum())
        assert w["v2"]["accuracy"] == _expected(labels[inside], cand[inside])["accuracy"]
    assert sum(w["v1"]["n"] for w in forward["series"]) == 300


def test_invalid_events_labels_and_scores_are_counted_not_scored() -> None:
    bt = Backtest("risk", candidate="v2", incumbent="v1", start_s=0.0, window_s=10.0)
    bt.invalid_many(["invalid_json", "missing_feature", "invalid_json"])
    x = np.zeros((4, 1), np.float32)
    bt.scored_many(
        ["a", "b", "c", "d"], x, [1.0, 2.0, 3.0, 4.0], [0.9, math.nan, 0.2, 1.5], [0.1] * 4
    )
    bt.invalid_labels(2)
    bt.labels_many([("a", 1.0), ("b", 1.0), ("c", 0.5), ("c", 0.0), ("c", 1.0), ("q", 0.0)])
    r = bt.report()
    c = r["counts"]
    assert c["events"] == 7 and c["scored_events"] == 2 and c["invalid_events"] == 5
    assert c["invalid_by_reason"] == {
        "invalid_json": 2,
        "missing_feature": 1,
        MODEL_OUTPUT_INVALID: 2,
    }
    assert c["labels"] == 8 and c["invalid_labels"] == 2 and c["non_binary_labels"] == 1
    assert c["joined"] == 2 and c["duplicate_labels"] == 1
    # "b" was not scored: its label waits for an event that never comes, as does "q"'s
    assert c["labels_without_event"] == 2 and c["unlabeled_events"] == 0
    assert r["metrics"]["v2"]["n"] == 2 and r["metrics"]["v2"]["accuracy"] == 1.0
    assert r["metrics"]["v1"]["accuracy"] == 0.5
    assert r["agreement"]["rate"] == 0.5


def test_an_empty_backtest_reports_zeros_not_errors() -> None:
    r = Backtest("risk", candidate="v2", incumbent="v1", start_s=0.0, window_s=1.0).report()
    assert r["agreement"]["rate"] is None
    assert r["score_difference"] == {"n": 0}
    assert r["metrics"]["v2"]["n"] == 0 and r["windows"]["series"] == []


def test_the_joiner_bound_evicts_and_says_so() -> None:
    bt = Backtest("risk", candidate="v2", incumbent="v1", start_s=0.0, window_s=1.0, max_pending=2)
    x = np.zeros((3, 1), np.float32)
    bt.scored_many(["a", "b", "c"], x, [0.0, 0.0, 0.0], [0.9] * 3, [0.1] * 3)
    bt.labels_many([("a", 1.0), ("c", 1.0)])
    c = bt.report()["counts"]
    assert c["evicted"] == 1 and c["joined"] == 1 and c["labels_without_event"] == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"incumbent": "v2"}, "same version"),
        ({"window_s": 0.0}, "window_s"),
        ({"threshold": 1.0}, "threshold"),
    ],
)
def test_arguments_are_checked(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {
        "candidate": "v2",
        "incumbent": "v1",
        "start_s": 0.0,
        "window_s": 1.0,
    } | kwargs
    with pytest.raises(ValueError, match=match):
        Backtest("risk", **args)  # type: ignore[arg-type]


def test_durations_and_timestamps() -> None:
    assert parse_duration_s("2h") == 7200.0
    assert parse_duration_s("1h30m") == 5400.0
    assert parse_duration_s("500ms") == 0.5
    for bad in ("", "2", "2x", "h", "-1h", "0s", "2h foo"):
        with pytest.raises(ValueError):
            parse_duration_s(bad)
    assert parse_timestamp_ms("1700000000123") == 1700000000123
    assert parse_timestamp_ms("2023-11-14T22:13:20") == 1700000000000  # no zone: UTC
    assert parse_timestamp_ms("2023-11-14T22:13:20.5+00:00") == 1700000000500
    with pytest.raises(ValueError, match="neither"):
        parse_timestamp_ms("yesterday")
    assert time_range_ms(None, "1000", "5000", now_ms=0) == (1000, 5000)
    assert time_range_ms("1m", None, None, now_ms=100_000) == (40_000, None)
    for since, start, until in (("1h", "1000", None), (None, None, None), (None, "5000", "1000")):
        with pytest.raises(ConfigError):
            time_range_ms(since, start, until, now_ms=10_000)


def test_the_command_refuses_bad_input_before_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    topology = str(ROOT / "topologies" / "phishing.yaml")
    cases = [
        (["--version", "v2"], "exactly one of --since"),
        (["--version", "v2", "--since", "2h", "--from-timestamp", "1"], "exactly one of"),
        (["--version", "v9", "--since", "2h"], "no version 'v9'"),
        (["--version", "v1", "--since", "2h"], "is the incumbent"),
        (["--version", "v2", "--model", "spam", "--since", "2h"], "no model 'spam'"),
        (["--version", "v2", "--since", "soon"], "not a duration"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["backtest", topology, *args])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, (args, err)
        assert message in err, (args, err)
