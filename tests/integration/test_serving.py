"""The core pipeline on a real broker: events in, predictions out, dead letters, crashes."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from collections import Counter
from typing import Any

import orjson

from stream_infer.examples.phishing import FEATURES
from tests.integration.conftest import good_events, wait_ready


def test_every_event_gets_exactly_one_prediction_stamped_with_its_version(make_setup: Any) -> None:
    setup = make_setup()
    n = 5000
    setup.produce(good_events(n))
    setup.start_worker()
    preds = setup.collect(setup.topics.predictions, until=n)
    ids = Counter(p["id"] for p in preds)
    assert len(ids) == n, f"{n - len(ids)} events without a prediction"
    assert set(ids) == {f"e-{i}" for i in range(n)}
    assert max(ids.values()) == 1
    assert {(p["model"], p["version"]) for p in preds} == {("risk", "v1")}
    assert all(0.0 <= p["prediction"] <= 1.0 for p in preds)
    # Nothing more arrives: no duplicates were produced after the last one was read.
    assert setup.collect(setup.topics.predictions, until=n + 1, timeout_s=2.0)[n:] == []


def test_bad_events_go_to_the_dead_letter_topic_while_good_ones_flow(make_setup: Any) -> None:
    setup = make_setup()
    bad: list[tuple[bytes | None, bytes]] = [
        (b"b1", b"{not json"),
        (b"b2", b"\xff\xfe\x00\x01binary"),
        (b"b3", b'{"id": 5, "features": []}'),
        (b"b4", b'{"id": "x-4"}'),
        (b"b5", b'{"id": "x-5", "features": [1, 2]}'),
        (b"b6", orjson.dumps({"id": "x-6", "features": {"https": "yes"}})),
        (b"b12", orjson.dumps({"id": "x-12", "features": dict.fromkeys(FEATURES, "yes")})),
        (b"b13", orjson.dumps({"id": "x-13", "features": dict.fromkeys([*FEATURES, "z"], 1)})),
        (b"b7", b"[1, 2, 3]"),
        (b"b8", b'{"id": "x-8", "v": 2, "features": []}'),
        (b"b9", b'{"id": "x-9", "features": [1e300, 0, 0, 0, 0, 0, 0, 0, 0]}'),
        (b"b10", b'{"id": "x-10", "features": [NaN, 0, 0, 0, 0, 0, 0, 0, 0]}'),
        (b"b11", b'{"id": "x-11", "features": [0, 0, 0, 0, 0, 0, 0, 0, 0]' + b" " * 70_000 + b"}"),
    ]
    good = good_events(300)
    padded = [*bad, *[None] * (len(good) - len(bad))]
    mixed = [item for pair in zip(good, padded, strict=True) for item in pair if item]
    setup.produce(mixed)
    setup.start_worker()
    dead = setup.collect(setup.topics.dead_letter, until=len(bad))
    preds = setup.collect(setup.topics.predictions, until=len(good))
    reasons = {d["key"]: d["error"] for d in dead}
    assert reasons == {
        "b1": "invalid_json",
        "b2": "invalid_json",
        "b3": "invalid_id",
        "b4": "missing_features",
        "b5": "wrong_feature_count",
        "b6": "missing_feature",
        "b12": "invalid_feature_type",
        "b13": "unexpected_feature",
        "b7": "not_an_object",
        "b8": "unsupported_schema_version",
        "b9": "non_finite_feature",
        "b10": "invalid_json",
        "b11": "oversized",
    }
    assert all(d["topic"] == setup.topics.input and d["offset"] >= 0 for d in dead)
    binary = next(d for d in dead if d["key"] == "b2")
    assert binary["raw_encoding"] == "base64"
    assert {p["id"] for p in preds} == {f"e-{i}" for i in range(len(good))}
    assert setup.workers[0].poll() is None, "the worker must survive bad input"


def test_sigkill_mid_stream_loses_no_event(make_setup: Any) -> None:
    setup = make_setup(batching={"max_batch_size": 64, "max_wait_ms": 5})
    n = 30_000
    setup.produce(good_events(n))
    worker = setup.start_worker()
    reader = setup.consumer(setup.topics.predictions)
    first: list[dict[str, Any]] = []
    deadline = time.monotonic() + 60
    # Kill once the worker has committed something and is still mid-stream.
    while setup.committed(setup.topics.input) == 0 and time.monotonic() < deadline:
        first += setup.collect(setup.topics.predictions, until=500, consumer=reader, timeout_s=1)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    # Everything the dead worker delivered (read, not ListOffsets: tansu under-reports it).
    while batch := setup.collect(setup.topics.predictions, 10**9, consumer=reader, timeout_s=2):
        first += batch
    produced_before_kill = len(first)
    committed_at_kill = setup.committed(setup.topics.input)
    assert 0 < committed_at_kill <= produced_before_kill < n, "not killed mid-stream"
    setup.start_worker()
    expected = {f"e-{i}" for i in range(n)}
    preds = first + setup.collect_until_ids(
        setup.topics.predictions, expected - {p["id"] for p in first}, consumer=reader
    )
    reader.close()
    ids = Counter(p["id"] for p in preds)
    missing = expected - set(ids)
    assert not missing, f"{len(missing)} events lost after SIGKILL"
    duplicates = sum(c - 1 for c in ids.values())
    # At-least-once: only what was served but not yet committed when the worker died is
    # served again.
    assert duplicates <= produced_before_kill - committed_at_kill


def test_sigterm_commits_what_was_delivered(make_setup: Any) -> None:
    """The shutdown alone must commit: the background auto-commit is pushed out of the way
    (once an hour), and SIGTERM comes the moment the last prediction is read, when the last
    batches' acknowledgements may still be on their way to the worker. It used to sleep 1 s
    first, so that the auto-commit had already committed everything: it could not fail."""
    setup = make_setup(kafka={"extra": {"auto.commit.interval.ms": 3_600_000}})
    n = 3000
    setup.produce(good_events(n))
    worker = setup.start_worker()
    assert len(setup.collect(setup.topics.predictions, until=n)) == n
    worker.terminate()
    assert worker.wait(30) == 0
    assert setup.committed(setup.topics.input) == n, "SIGTERM did not commit every delivery"
    setup.produce(good_events(10, prefix="after"))
    setup.start_worker()
    preds = setup.collect(setup.topics.predictions, until=n + 10)
    late = [p["id"] for p in preds[n:]]
    assert sorted(late) == sorted(f"after-{i}" for i in range(10)), "old events re-served"


def test_health_readiness_and_metrics_endpoints(make_setup: Any) -> None:
    setup = make_setup()
    port = setup.doc["worker"]["web_port"]
    setup.start_worker(web_port=port)
    wait_ready(port)
    setup.produce([*good_events(100), (b"bad", b"junk")])
    setup.collect(setup.topics.predictions, until=100)
    time.sleep(0.5)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert 'stream_infer_predictions_total{model="risk",version="v1"} 100.0' in text
    assert 'stream_infer_dead_letters_total{reason="invalid_json"} 1.0' in text
    assert "stream_infer_batch_size_bucket" in text
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
        assert r.status == 200
