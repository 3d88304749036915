"""`stream-infer backtest` on a real broker (issue 17 item 2): a known window of events and labels
is replayed, and the report equals scoring the same events in-process; the backtest writes
nothing to Kafka and leaves the serving group's offsets alone; --since and --from-timestamp pick
the right start.

The events carry producer timestamps (CreateTime) placed in the past: an "old" stretch three
hours ago, then the window half an hour ago. Offsets-for-times finds the window's first offset in
every partition.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import torch
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from stream_infer.cli import main
from stream_infer.examples import phishing
from stream_infer.inference.predictor import TorchPredictor
from stream_infer.online.backtest import QUANTILES
from stream_infer.online.prequential import Prequential
from tests.brokers import broker_choice
from tests.integration.conftest import MODELS

N_OLD = 200  # events three hours ago: before every start the test asks for
N_WINDOW = 600  # events in the window, 100 ms apart
N_INVALID = 12  # malformed events at the window's start
N_LABELLED = 450  # window events whose label arrives (the rest stay unlabelled)
STEP_MS = 100


def _produce(bootstrap: str, topic: str, items: list[tuple[int, bytes, bytes]]) -> None:
    """(timestamp ms, key, value) in the given order, with the producer's timestamps."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for ts, key, value in items:
        producer.produce(topic, value, key, timestamp=ts)
        producer.poll(0)
    assert producer.flush(30) == 0


def _run(*args: str, quiet: bool = True) -> None:
    try:
        main(["backtest", *args, "--idle-timeout", "5", *(["--quiet"] if quiet else [])])
    except SystemExit as exc:  # main exits only on an error
        raise AssertionError(f"backtest exited {exc.code}") from None


def _score(version: str, x: Any) -> Any:
    _, predictor = TorchPredictor.load(
        MODELS / version,
        model="risk",
        version=version,
        features=phishing.FEATURES,
        device=torch.device("cpu"),
    )
    return predictor.predict_many(x)


def _expected(labels: Any, scores: Any) -> dict[str, float]:
    preq = Prequential(1000)
    for y, p in zip(labels.tolist(), scores.tolist(), strict=True):
        preq.update_one(y, p)
    return preq.report()


def _watermarks(bootstrap: str, topics: list[str]) -> dict[str, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "it-watermarks"})
    try:
        out = {}
        for topic in topics:
            meta = consumer.list_topics(topic, timeout=10).topics[topic]
            out[topic] = sum(
                consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in meta.partitions
            )
        return out
    finally:
        consumer.close()


def _groups(bootstrap: str) -> set[str]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    result = admin.list_consumer_groups(request_timeout=10).result()
    return {g.group_id for g in result.valid}


def test_backtest_equals_scoring_the_window_in_process(make_setup: Any, tmp_path: Path) -> None:
    if not broker_choice().is_apache_kafka:
        # Seen on tansu 0.6.0: the backtest read 4 of the window's 612 events (its ListOffsets
        # under-reports a partition's end when the last batch held several records: BROKER.md).
        pytest.skip("needs Apache Kafka's ListOffsets (by time and end offsets); tansu's differs")
    versions = [{"version": v, "path": str(MODELS / v)} for v in ("v1", "v2", "v3-degraded")]
    setup = make_setup(models=[{"name": "risk", "serving": "v1", "versions": versions}])
    topics, bootstrap = setup.topics, setup.bootstrap
    now_ms = int(time.time() * 1000)
    old_ms = now_ms - 3 * 3600 * 1000
    window_ms = now_ms - 30 * 60 * 1000

    rows = phishing.events(seed=11)
    old, window = [], []
    for i in range(N_OLD):
        event_id, feats, label = next(rows)
        old.append((old_ms + i * STEP_MS, event_id, feats, label))
    for i in range(N_WINDOW):
        event_id, feats, label = next(rows)
        window.append((window_ms + (N_INVALID + i) * STEP_MS, event_id, feats, label))
    invalid = [
        (window_ms + i * STEP_MS, b"k-bad", b"{not json" if i % 2 else b'{"id": "x"}')
        for i in range(N_INVALID)
    ]
    _produce(
        bootstrap,
        topics.input,
        [(ts, i.encode(), orjson.dumps({"id": i, "features": f})) for ts, i, f, _ in old]
        + invalid
        + [(ts, i.encode(), orjson.dumps({"id": i, "features": f})) for ts, i, f, _ in window],
    )
    # Labels: the old events' in the old stretch, but 20 of them late (inside the window: they
    # find no event there); 450 of the window's, each 0.5-5 s after its event; 3 malformed.
    rng = random.Random(5)
    late = [(window_ms + 10 + k, i, y) for k, (_, i, _, y) in enumerate(old[:20])]
    labels = [(ts + 1000, i, y) for ts, i, _, y in old[20:]] + late
    labels += [(ts + rng.randint(500, 5000), i, y) for ts, i, _, y in window[:N_LABELLED]]
    labels.sort()
    items = [(ts, i.encode(), orjson.dumps({"id": i, "label": y})) for ts, i, y in labels]
    items += [(window_ms + 20 + k, b"k", b'{"label": 1}') for k in range(3)]
    items.sort(key=lambda item: item[0])
    _produce(bootstrap, topics.labels, items)

    # The serving group has committed offsets: the backtest must not move them.
    serving = Consumer({"bootstrap.servers": bootstrap, "group.id": setup.topology.group_id})
    committed = [TopicPartition(topics.input, p, 3) for p in range(4)]
    serving.commit(offsets=committed, asynchronous=False)
    serving.close()
    groups_before = _groups(bootstrap)
    outputs = [topics.predictions, topics.dead_letter, topics.shadow, topics.drift]
    outputs += [topics.control, topics.acks]
    marks_before = _watermarks(bootstrap, outputs)

    # 1. --from-timestamp at the window's start, v2 against the serving v1.
    report_path, plot_path = tmp_path / "report.json", tmp_path / "report.png"
    _run(
        str(setup.path),
        "--version",
        "v2",
        "--from-timestamp",
        str(window_ms),
        "--out",
        str(report_path),
        "--plot",
        str(plot_path),
    )
    report = orjson.loads(report_path.read_bytes())
    assert report["replay"]["incomplete"] == []  # every partition read to its end
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    x = np.array([[f[n] for n in phishing.FEATURES] for _, _, f, _ in window], np.float32)
    y = np.array([float(lab) for *_, lab in window])
    scores = {v: _score(v, x) for v in ("v1", "v2", "v3-degraded")}
    assert report["incumbent"] == "v1" and report["candidate"] == "v2"
    for version in ("v1", "v2"):
        want = _expected(y[:N_LABELLED], scores[version][:N_LABELLED])
        got = report["metrics"][version]
        assert got["n"] == want["n"] == N_LABELLED
        assert got["accuracy"] == want["accuracy"]
        assert got["roc_auc"] == want["roc_auc"]
        assert got["log_loss"] == pytest.approx(want["log_loss"], rel=1e-6)
    diffs = scores["v2"] - scores["v1"]
    assert report["agreement"]["rate"] == ((scores["v2"] > 0.5) == (scores["v1"] > 0.5)).mean()
    assert list(report["score_difference"]["quantiles"].values()) == pytest.approx(
        np.quantile(diffs, QUANTILES).tolist(), abs=1e-6
    )
    counts = report["counts"]
    assert counts["events"] == N_WINDOW + N_INVALID
    assert counts["scored_events"] == N_WINDOW
    assert counts["invalid_by_reason"] == {"invalid_json": 6, "missing_features": 6}
    assert counts["joined"] == N_LABELLED
    assert counts["unlabeled_events"] == N_WINDOW - N_LABELLED
    assert counts["labels_without_event"] == 20  # the old events' late labels
    assert counts["invalid_labels"] == 3
    assert counts["labels"] == N_LABELLED + 20 + 3
    assert sum(w["v2"]["n"] for w in report["windows"]["series"]) == N_LABELLED

    # 2. --since 1h (the old stretch is 3 h ago): the same events; the degraded version loses.
    _run(
        str(setup.path),
        "--version",
        "v3-degraded",
        "--since",
        "1h",
        "--out",
        str(report_path),
        quiet=False,  # with the progress bar
    )
    report = orjson.loads(report_path.read_bytes())
    assert report["counts"]["events"] == N_WINDOW + N_INVALID
    assert report["counts"]["joined"] == N_LABELLED
    got = report["metrics"]["v3-degraded"]
    want = _expected(y[:N_LABELLED], scores["v3-degraded"][:N_LABELLED])
    assert got["accuracy"] == want["accuracy"]
    assert got["log_loss"] > report["metrics"]["v1"]["log_loss"] + 0.2
    assert report["difference"]["accuracy"] < -0.2

    # 3. --from-timestamp in the middle, --until before the end: exactly the events between.
    first, last = 100, 400
    _run(
        str(setup.path),
        "--version",
        "v2",
        "--from-timestamp",
        str(window[first][0]),
        "--until",
        str(window[last][0]),
        "--out",
        str(report_path),
    )
    report = orjson.loads(report_path.read_bytes())
    assert report["counts"]["events"] == report["counts"]["scored_events"] == last - first
    start_ms, until_ms = window[first][0], window[last][0]
    read = {i for ts, i, _ in labels if start_ms <= ts < until_ms}
    rows = [k for k in range(first, last) if window[k][1] in read]
    assert 0 < len(rows) < last - first  # some labels come after --until
    assert report["counts"]["joined"] == report["metrics"]["v2"]["n"] == len(rows)
    assert report["counts"]["labels"] == len(read)
    want = _expected(y[rows], scores["v2"][rows])
    assert report["metrics"]["v2"]["accuracy"] == want["accuracy"]
    assert report["metrics"]["v2"]["log_loss"] == pytest.approx(want["log_loss"], rel=1e-6)

    # Nothing was written, no group appeared, the serving group's offsets did not move.
    assert _watermarks(bootstrap, outputs) == marks_before == dict.fromkeys(outputs, 0)
    assert _groups(bootstrap) == groups_before
    assert not any(g.startswith("stream-infer-backtest-") for g in _groups(bootstrap))
    reader = Consumer({"bootstrap.servers": bootstrap, "group.id": setup.topology.group_id})
    try:
        after = reader.committed([TopicPartition(topics.input, p) for p in range(4)], timeout=10)
    finally:
        reader.close()
    assert [(tp.partition, tp.offset) for tp in after] == [(p, 3) for p in range(4)]
