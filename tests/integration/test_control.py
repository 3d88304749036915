"""The control topic on a real broker, with two workers in one group."""

from __future__ import annotations

import shutil
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from stream_infer.cli import main
from stream_infer.io.control_log import ControlLog
from stream_infer.io.controller import Controller, new_command
from stream_infer.local.loadgen import OpenLoopProducer
from stream_infer.local.tansu import free_port
from tests.brokers import broker_choice
from tests.integration.conftest import MODELS, Setup, good_events, scrape


def start_group(setup: Setup, n: int = 2) -> list[int]:
    """Start n workers and wait until together they own every input partition."""
    ports = [free_port() for _ in range(n)]
    for port in ports:
        setup.start_worker(web_port=port)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        owned = [scrape(p, "stream_infer_assigned_partitions") for p in ports]
        if sum(owned) == 4 and all(owned):
            return ports
        time.sleep(0.5)
    raise AssertionError("the group never settled:\n" + setup.worker_logs())


def command(ctl: Controller, name: str, workers: int = 2, **fields: Any) -> list[dict[str, Any]]:
    sent = ctl.send(new_command(name, **fields))
    acks = ctl.acks(sent["id"], wait_s=30, workers=workers)
    assert len({a["worker"] for a in acks}) == workers, f"acks: {acks}"
    return acks


def routes_of(acks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [a["routing"]["routes"] for a in acks]


def test_swap_under_load_loses_nothing_and_switches(make_setup: Any) -> None:
    setup = make_setup()
    start_group(setup)
    ctl = Controller(setup.topology)
    n = 8000
    events = iter(good_events(n))
    producer = OpenLoopProducer(
        {"bootstrap.servers": setup.bootstrap}, setup.topics.input, events, rate=1000.0, count=n
    ).start()
    time.sleep(3.0)
    sent_at = time.time()
    acks = command(ctl, "swap", model="risk", version="v2")
    assert all(a["status"] == "applied" for a in acks)
    assert (
        routes_of(acks)[0]
        == routes_of(acks)[1]
        == {"risk": {"weights": {"v2": 1.0}, "shadow": None}}
    )
    acked_at = max(a["ts"] for a in acks)
    producer.join(30)
    ctl.close()
    preds = setup.collect_until_ids(setup.topics.predictions, {f"e-{i}" for i in range(n)})
    ids = Counter(p["id"] for p in preds)
    assert len(ids) == n, f"{n - len(ids)} events without a prediction"
    assert sum(ids.values()) == n, "duplicates without a rebalance"
    after = [p for p in preds if p["served_at"] > acked_at]
    assert after and {p["version"] for p in after} == {"v2"}
    first_v2 = min(p["served_at"] for p in preds if p["version"] == "v2")
    print(f"command to first v2 prediction: {(first_v2 - sent_at) * 1000:.0f} ms")
    assert {p["version"] for p in preds} == {"v1", "v2"}


def test_split_is_sticky_and_moves_keys_only_toward_the_growing_version(make_setup: Any) -> None:
    setup = make_setup()
    start_group(setup)
    ctl = Controller(setup.topology)
    command(ctl, "split", model="risk", weights={"v1": 0.9, "v2": 0.1})
    keys = 20_000

    def round_of(prefix: str) -> dict[str, set[str]]:
        items = [
            (f"key-{i % keys}".encode(), value)
            for i, (_, value) in enumerate(good_events(2 * keys, prefix=prefix))
        ]
        setup.produce(items)
        preds = setup.collect_until_ids(
            setup.topics.predictions, {f"{prefix}-{i}" for i in range(2 * keys)}
        )
        by_key: dict[str, set[str]] = defaultdict(set)
        for p in preds:
            if p["id"].startswith(prefix + "-"):
                by_key[f"key-{int(p['id'].split('-')[1]) % keys}"].add(p["version"])
        return by_key

    first = round_of("a")
    assert len(first) == keys
    assert all(len(v) == 1 for v in first.values()), "a key was served by two versions"
    share = sum(1 for v in first.values() if v == {"v2"}) / keys
    assert abs(share - 0.1) <= 0.01, f"v2 share {share:.4f}"
    command(ctl, "split", model="risk", weights={"v1": 0.5, "v2": 0.5})
    second = round_of("b")
    ctl.close()
    assert all(len(v) == 1 for v in second.values())
    share = sum(1 for v in second.values() if v == {"v2"}) / keys
    assert abs(share - 0.5) <= 0.01, f"v2 share {share:.4f}"
    moved_back = [k for k, v in first.items() if v == {"v2"} and second[k] == {"v1"}]
    assert not moved_back, f"{len(moved_back)} keys moved from v2 to v1"


def test_shadow_scores_every_event_without_touching_predictions(make_setup: Any) -> None:
    setup = make_setup()
    start_group(setup)
    ctl = Controller(setup.topology)
    command(ctl, "shadow", model="risk", version="v2")
    n = 3000
    setup.produce(good_events(n))
    preds = setup.collect_until_ids(setup.topics.predictions, {f"e-{i}" for i in range(n)})
    shadow = setup.collect_until_ids(setup.topics.shadow, {f"e-{i}" for i in range(n)})
    assert Counter(p["id"] for p in preds) == Counter(f"e-{i}" for i in range(n))
    assert {p["version"] for p in preds} == {"v1"}
    assert Counter(p["id"] for p in shadow) == Counter(f"e-{i}" for i in range(n))
    assert {p["version"] for p in shadow} == {"v2"}
    acks = command(ctl, "shadow", model="risk", version=None)
    assert routes_of(acks)[0]["risk"]["shadow"] is None
    ctl.close()


def test_bad_commands_are_rejected_and_change_nothing(make_setup: Any, tmp_path: Path) -> None:
    corrupt = tmp_path / "v3"
    shutil.copytree(MODELS / "v2", corrupt)
    artifact = corrupt / "model.pt"
    data = bytearray(artifact.read_bytes())
    data[-1] ^= 0xFF
    artifact.write_bytes(bytes(data))
    setup = make_setup(
        models=[
            {
                "name": "risk",
                "serving": "v1",
                "versions": [
                    {"version": "v1", "path": str(MODELS / "v1")},
                    {"version": "v3", "path": str(corrupt)},
                ],
            }
        ]
    )
    start_group(setup)
    ctl = Controller(setup.topology)
    original = {"risk": {"weights": {"v1": 1.0}, "shadow": None}}
    cases = [
        (new_command("swap", model="nope", version="v1"), "unknown_model"),
        (new_command("swap", model="risk", version="v9"), "unknown_version"),
        (new_command("split", model="risk", weights={"v1": 1.5, "v3": -0.5}), "invalid_weights"),
        (new_command("split", model="risk", weights={"v1": 0.5, "v3": 0.2}), "invalid_weights"),
        (new_command("explode", model="risk"), "unknown_command"),
        (new_command("rollback", model="risk"), "nothing_to_roll_back"),
    ]
    for doc, reason in cases:
        sent = ctl.send(doc)
        acks = ctl.acks(sent["id"], wait_s=30, workers=2)
        assert [a["status"] for a in acks] == ["rejected", "rejected"], acks
        assert {a["reason"] for a in acks} == {reason}, (doc, acks)
        assert routes_of(acks) == [original, original]
    # Malformed JSON has no id: it is answered with command_id null.
    ctl._producer.produce(setup.topics.control, b"{not json")
    ctl._producer.flush(10)
    acks = ctl.acks(None, wait_s=30, workers=2)
    assert {a["reason"] for a in acks} == {"malformed_command"}
    # A version that does not load is no rejection (the routing is the log's, on every
    # worker): applied_not_loaded, and the last routing that loaded keeps serving.
    sent = ctl.send(new_command("swap", model="risk", version="v3"))
    acks = ctl.acks(sent["id"], wait_s=30, workers=2)
    assert [a["status"] for a in acks] == ["applied_not_loaded"] * 2, acks
    assert {a["reason"] for a in acks} == {"artifact_invalid"}
    assert [a["serving"] for a in acks] == [original, original]
    v3 = {"risk": {"weights": {"v3": 1.0}, "shadow": None}}
    assert routes_of(acks) == [v3, v3]
    ctl.close()
    setup.produce(good_events(500))
    preds = setup.collect_until_ids(setup.topics.predictions, {f"e-{i}" for i in range(500)})
    assert {p["version"] for p in preds} == {"v1"}


def test_signed_commands_only_when_a_key_is_set(make_setup: Any) -> None:
    setup = make_setup(control={"hmac_key": "s3cret"})
    start_group(setup, n=1)
    signed = Controller(setup.topology)
    unsigned_doc = new_command("swap", model="risk", version="v2")
    signed._producer.produce(setup.topics.control, orjson.dumps(unsigned_doc))
    signed._producer.flush(10)
    assert [a["reason"] for a in signed.acks(unsigned_doc["id"], wait_s=30, workers=1)] == [
        "unsigned"
    ]
    forged = unsigned_doc | {"id": "forged", "signature": "0" * 64}
    signed._producer.produce(setup.topics.control, orjson.dumps(forged))
    signed._producer.flush(10)
    assert [a["reason"] for a in signed.acks("forged", wait_s=30, workers=1)] == ["bad_signature"]
    acks = command(signed, "swap", workers=1, model="risk", version="v2")
    assert acks[0]["status"] == "applied"
    signed.close()
    logs = setup.worker_logs()
    assert "s3cret" not in logs


def test_a_restarted_worker_rebuilds_the_same_routing(make_setup: Any) -> None:
    setup = make_setup()
    start_group(setup)
    ctl = Controller(setup.topology)
    command(ctl, "split", model="risk", weights={"v1": 0.7, "v2": 0.3})
    command(ctl, "swap", model="risk", version="v2")
    command(ctl, "shadow", model="risk", version="v1")
    command(ctl, "swap", model="risk", version="v2")  # changes nothing: no history
    acks = command(ctl, "rollback", model="risk")  # undoes the shadow
    expected = {"risk": {"weights": {"v2": 1.0}, "shadow": None}}
    assert routes_of(acks) == [expected, expected]
    restarted = setup.workers[0]
    restarted.terminate()
    assert restarted.wait(30) == 0
    port = free_port()
    setup.start_worker(web_port=port)
    # Commands sent while a worker starts are part of the log it replays, not answered: wait
    # until it serves before asking.
    deadline = time.monotonic() + 60
    while scrape(port, "stream_infer_ready") != 1.0 and time.monotonic() < deadline:
        time.sleep(0.3)
    acks = command(ctl, "status")
    ctl.close()
    assert routes_of(acks) == [expected, expected]


def test_replay_ends_at_a_transaction_marker_and_on_a_log_whose_records_all_expired(
    bootstrap: str,
) -> None:
    """Issue 13 item 15, on a real broker: a log whose last offset is a transaction marker,
    then the same log with every record deleted (low = high > 0)."""
    if not broker_choice().is_apache_kafka:
        pytest.skip("needs a broker with transactions and DeleteRecords (Apache Kafka)")
    topic = f"ctl-replay-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    plain = Producer({"bootstrap.servers": bootstrap})
    plain.produce(topic, b"a")
    assert plain.flush(30) == 0
    tx = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"tx-{topic}"})
    tx.init_transactions(30)
    tx.begin_transaction()
    tx.produce(topic, b"b")
    tx.commit_transaction(30)  # the commit marker is the log's last offset
    conf = {"bootstrap.servers": bootstrap}
    probe = ControlLog(conf, topic)
    try:
        # The coordinator writes the marker after commit_transaction returns: wait for it.
        deadline = time.monotonic() + 15
        while True:
            marks = probe._consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
            if marks == (0, 3) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert marks == (0, 3), "a, b and the commit marker"
    finally:
        probe.close()
    started = time.monotonic()
    log = ControlLog(conf, topic)
    try:
        assert [m.value() for m in log.replay(timeout_s=10)] == [b"a", b"b"]
    finally:
        log.close()
    print(f"replay to a marker: {time.monotonic() - started:.2f} s")
    deleted = admin.delete_records([TopicPartition(topic, 0, 3)])
    deleted[TopicPartition(topic, 0, 3)].result(30)
    started = time.monotonic()
    log = ControlLog(conf, topic)
    try:
        low, high = log._consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        assert low == high == 3
        assert log.replay(timeout_s=10) == []
    finally:
        log.close()
    print(f"replay of an all-deleted log: {time.monotonic() - started:.2f} s")
    admin.delete_topics([topic])


def test_control_never_creates_the_control_topic(
    make_setup: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`stream-infer control` on a cluster without the control topic: the broker would
    auto-create it on the first produce, with its default partitions and retention (the issue
    seen: 4 partitions, 7 days). It refuses instead, names the topic and sends nothing."""
    setup = make_setup()
    fresh = f"{setup.topics.control}.fresh"
    monkeypatch.setenv("STREAM_INFER_TOPICS__CONTROL", fresh)
    with pytest.raises(SystemExit) as exited:
        main(["control", str(setup.path), "status", "--wait", "1"])
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert f"{fresh} does not exist" in err and "stream-infer topics" in err, err
    admin = AdminClient({"bootstrap.servers": setup.bootstrap})
    assert fresh not in admin.list_topics(timeout=10).topics
