"""Online learning and drift on a real broker: labels joined to served events, River learners,
prequential metrics, ADWIN drift events and a policy acting through the control topic."""

from __future__ import annotations

import time
from typing import Any

import orjson
from river import compose, datasets, evaluate, linear_model, metrics, preprocessing

from stream_infer.io.controller import Controller, new_command
from tests.integration.conftest import good_events, metric, scrape
from tests.integration.test_control import start_group


def test_prequential_accuracy_through_kafka_equals_river_progressive_validation(
    make_setup: Any,
) -> None:
    setup = make_setup(online={"learners": [{"model": "risk", "version": "online"}]})
    (port,) = start_group(setup, n=1)
    rows = list(datasets.Phishing())
    events = [
        (b"one-key", orjson.dumps({"id": f"p-{i}", "features": x})) for i, (x, _) in enumerate(rows)
    ]
    setup.produce(events)
    setup.collect_until_ids(setup.topics.predictions, {f"p-{i}" for i in range(len(rows))})
    # Labels in the dataset's order, after their events: test-then-train in the same order as
    # river's progressive validation.
    labels = [
        (b"one-key", orjson.dumps({"id": f"p-{i}", "label": bool(y)}))
        for i, (_, y) in enumerate(rows)
    ]
    setup.produce(labels, topic=setup.topics.labels)
    deadline = time.monotonic() + 60
    learned = 0.0
    while time.monotonic() < deadline:
        learned = scrape(port, "stream_infer_learner_learned_total", model="risk", version="online")
        if learned >= len(rows):
            break
        time.sleep(0.5)
    assert learned == len(rows)
    time.sleep(1.5)  # the prequential gauges are exported every second
    ours = metric(
        port, "stream_infer_prequential", model="risk", version="online", metric="accuracy"
    )
    model = compose.Pipeline(preprocessing.StandardScaler(), linear_model.LogisticRegression())
    reference = evaluate.progressive_val_score(datasets.Phishing(), model, metrics.Accuracy())
    print(f"prequential accuracy: stream-infer {ours:.6f}, river {reference.get():.6f}")
    assert ours == reference.get()
    # The torch version that served every event is scored on the same labels.
    served = metric(port, "stream_infer_prequential", model="risk", version="v1", metric="accuracy")
    assert 0.8 < served <= 1.0


def test_a_policy_rolls_back_a_canary_whose_error_drifts_up(make_setup: Any) -> None:
    setup = make_setup(
        online={
            "monitors": [{"signal": "error", "delta": 0.002}],
            "policies": [{"signal": "error", "action": "rollback_canary"}],
        },
    )
    start_group(setup, n=1)
    ctl = Controller(setup.topology)
    acks = ctl.acks(
        ctl.send(new_command("split", model="risk", weights={"v1": 0.8, "v2": 0.2}))["id"],
        wait_s=30,
        workers=1,
    )
    assert acks and acks[0]["status"] == "applied"
    n = 4000
    events = good_events(n, prefix="d")
    key_of = {orjson.loads(value)["id"]: key for key, value in events}
    setup.produce(events)
    preds = setup.collect_until_ids(setup.topics.predictions, {f"d-{i}" for i in range(n)})
    by_id = {p["id"]: p for p in preds}
    v2_ids = [f"d-{i}" for i in range(n) if by_id[f"d-{i}"]["version"] == "v2"]
    assert len(v2_ids) > 400
    change = v2_ids[len(v2_ids) // 2]
    labels = []
    drifted = False
    for i in range(n):
        p = by_id[f"d-{i}"]
        drifted = drifted or p["id"] == change
        right = p["prediction"] >= 0.5
        # After the change point the canary is always wrong; v1 stays right throughout.
        label = (not right) if (drifted and p["version"] == "v2") else right
        # Keyed like its event (the README's keying rule).
        labels.append((key_of[p["id"]], orjson.dumps({"id": p["id"], "label": label})))
    setup.produce(labels, topic=setup.topics.labels)
    drift = setup.collect(setup.topics.drift, until=1, timeout_s=60)
    assert drift, "no drift event:\n" + setup.worker_logs()
    assert {(d["model"], d["version"], d["signal"]) for d in drift} == {("risk", "v2", "error")}
    acks = ctl.acks(None, wait_s=30)
    ctl.close()
    policy = [a for a in acks if str(a["command_id"]).startswith("drift-")]
    assert policy and policy[0]["status"] == "applied", acks
    assert policy[-1]["routing"]["routes"]["risk"]["weights"] == {"v1": 1.0}


def test_labels_keyed_like_their_events_all_join_across_two_workers(make_setup: Any) -> None:
    """The README's keying rule with the partitions spread over two workers: a label produced
    with its event's key (same partitioner) reaches the worker that served the event."""
    setup = make_setup(online={"learners": [{"model": "risk", "version": "online"}]})
    ports = start_group(setup, n=2)  # 4 partitions, each worker owns some
    n = 2000
    events = good_events(n, prefix="j")
    setup.produce(events)
    ids = {f"j-{i}" for i in range(n)}
    setup.collect_until_ids(setup.topics.predictions, ids)
    labels = [
        (key, orjson.dumps({"id": orjson.loads(value)["id"], "label": True}))
        for key, value in events
    ]
    # Two records of the labels topic that are not labels: dead letters of their batch.
    invalid = [(b"x-1", b"{not json"), (b"x-2", orjson.dumps({"id": "j-1", "label": "yes"}))]
    setup.produce(labels + invalid, topic=setup.topics.labels)
    deadline = time.monotonic() + 60
    joined = [0.0, 0.0]
    while time.monotonic() < deadline:
        joined = [scrape(p, "stream_infer_labels_total", status="joined") for p in ports]
        if sum(joined) >= n:
            break
        time.sleep(0.5)
    assert sum(joined) == n, f"joined {joined}:\n" + setup.worker_logs()
    assert all(joined), f"one worker joined nothing: {joined}"
    for port in ports:
        assert scrape(port, "stream_infer_labels_waiting", kind="early") == 0
        assert scrape(port, "stream_infer_labels_lost_total") == 0
    dead = setup.collect(setup.topics.dead_letter, until=2, timeout_s=30)
    assert sorted((d["error"], d["key"]) for d in dead) == [
        ("invalid_label", "x-1"),
        ("invalid_label", "x-2"),
    ]
    assert sum(scrape(p, "stream_infer_labels_total", status="invalid") for p in ports) == 2
