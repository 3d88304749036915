"""Scale-out: 8 partitions, workers 1 -> 4 -> 2 under steady load, nothing lost, under both
consumer group protocols (classic, and KIP-848's consumer protocol where the broker has it).

Each protocol's rebalance pause is measured from the predictions themselves: for every input
partition, the longest gap between two consecutive predictions of its events around a
workers-join or workers-leave step. Under load each partition is served every few tens of ms,
so a gap of seconds is the time that partition was owned by nobody (or by a worker still
starting on it). After the last step, labels for fresh events must all be joined: the two
workers own the input and labels partitions co-partitioned.
"""

from __future__ import annotations

import bisect
import itertools
import statistics
import time
from collections import Counter, defaultdict
from typing import Any

import orjson
import pytest

from stream_infer.local.loadgen import OpenLoopProducer
from stream_infer.local.tansu import free_port
from tests.brokers import broker_choice
from tests.integration.conftest import Setup, good_events, scrape

PARTITIONS = 8
RATE = 400.0
PHASE_S = 4.0
# A gap between two predictions of one partition longer than this counts as a pause.
PAUSE_S = 0.5
PROTOCOLS: dict[str, dict[str, Any]] = {
    "classic": {},
    # The broker owns the session timeout under the consumer protocol: the setting is refused.
    "consumer": {"group_protocol": "consumer", "session_timeout_ms": None},
}


def _settle(setup: Setup, ports: list[int], timeout_s: float = 120) -> list[float]:
    """Wait until the given workers together own every partition, each at least one."""
    deadline = time.monotonic() + timeout_s
    owned: list[float] = []
    while time.monotonic() < deadline:
        owned = [scrape(p, "stream_infer_assigned_partitions") for p in ports]
        if sum(owned) == PARTITIONS and all(owned):
            return owned
        time.sleep(0.2)
    raise AssertionError(f"not settled: {owned}\n" + setup.worker_logs())


def _partitions_of(setup: Setup, n: int) -> dict[str, int]:
    """Event id -> the input partition it was produced to (read back from the input topic)."""
    consumer = setup.consumer(setup.topics.input)
    out: dict[str, int] = {}
    deadline = time.monotonic() + 60
    try:
        while len(out) < n and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.5):
                if msg.error() is None:
                    out[orjson.loads(msg.value())["id"]] = msg.partition()
    finally:
        consumer.close()
    return out


def _pauses(times: list[float], start: float, end: float) -> list[float]:
    """Gaps longer than PAUSE_S between consecutive ``times`` (sorted) that overlap [start, end]."""
    lo = max(0, bisect.bisect_left(times, start) - 1)
    hi = bisect.bisect_right(times, end) + 1
    window = times[lo:hi]
    return [b - a for a, b in itertools.pairwise(window) if b - a > PAUSE_S]


def _report(
    step: str, served: dict[int, list[float]], everything: list[float], start: float, end: float
) -> float:
    per_partition = {p: _pauses(t, start, end) for p, t in served.items()}
    longest = {p: max(g, default=0.0) for p, g in per_partition.items()}
    paused = sum(sum(g) for g in per_partition.values())
    output_gap = max(_pauses(everything, start, end), default=0.0)
    print(
        f"  {step}: longest partition pause {max(longest.values()):.1f} s (median over "
        f"partitions {statistics.median(longest.values()):.1f} s), {paused:.1f} partition-s "
        f"paused in {sum(len(g) for g in per_partition.values())} pauses, longest gap in the "
        f"whole output {output_gap:.1f} s, settled {end - start:.1f} s after the step"
    )
    return max(longest.values())


# CI runs the default protocol (classic); the consumer protocol (KIP-848) is a soak variant
# (`python3 dev.py soak`), to keep the suite's time down.
@pytest.mark.parametrize(
    "protocol",
    ["classic", pytest.param("consumer", marks=[pytest.mark.soak, pytest.mark.timeout(900)])],
)
def test_workers_scale_1_4_2_under_load_without_loss(make_setup: Any, protocol: str) -> None:
    if protocol == "consumer" and not broker_choice().is_apache_kafka:
        pytest.skip("the consumer group protocol (KIP-848) needs Apache Kafka 4.0+, not tansu")
    setup = make_setup(
        topics={"partitions": PARTITIONS},
        kafka=PROTOCOLS[protocol],
        online={"learners": [{"model": "risk", "version": "online"}]},
    )
    ports = [free_port() for _ in range(4)]
    setup.start_worker(web_port=ports[0])
    _settle(setup, ports[:1])
    producer = OpenLoopProducer(
        {"bootstrap.servers": setup.bootstrap},
        setup.topics.input,
        iter(good_events(10**6)),
        rate=RATE,
    ).start()
    time.sleep(PHASE_S)
    joined_at = time.time()
    for port in ports[1:]:
        setup.start_worker(web_port=port)
    owned4 = _settle(setup, ports)
    settled4 = time.time()
    time.sleep(PHASE_S)
    left_at = time.time()
    for proc in setup.workers[2:]:
        proc.terminate()
    for proc in setup.workers[2:]:
        assert proc.wait(60) == 0
    owned2 = _settle(setup, ports[:2])
    settled2 = time.time()
    time.sleep(PHASE_S)
    producer.stop()
    n = producer.sent
    assert producer.errors == 0
    preds = setup.collect_until_ids(
        setup.topics.predictions, {f"e-{i}" for i in range(n)}, timeout_s=180
    )
    ids = Counter(p["id"] for p in preds)
    assert len(ids) == n, f"{n - len(ids)} events lost while scaling"
    partition_of = _partitions_of(setup, n)
    served: dict[int, list[float]] = defaultdict(list)
    for p in preds:
        served[partition_of[p["id"]]].append(p["served_at"])
    for times in served.values():
        times.sort()
    everything = sorted(p["served_at"] for p in preds)
    print(
        f"\n{protocol} protocol: {n} events at {RATE:,.0f}/s, duplicates "
        f"{sum(ids.values()) - n}; partitions owned: 4 workers {owned4}, 2 workers {owned2}"
    )
    _report("3 workers join", served, everything, joined_at, settled4)
    _report("2 workers leave", served, everything, left_at, settled2)

    # Co-partitioned: each label reaches the worker that served its event.
    k = 400
    setup.produce(good_events(k, prefix="lab"))
    preds = setup.collect_until_ids(setup.topics.predictions, {f"lab-{i}" for i in range(k)})
    assert {p["id"] for p in preds} >= {f"lab-{i}" for i in range(k)}
    labels = [
        (key, orjson.dumps({"id": orjson.loads(raw)["id"], "label": True}))
        for key, raw in good_events(k, prefix="lab")
    ]
    setup.produce(labels, topic=setup.topics.labels)
    deadline = time.monotonic() + 30
    joined = early = 0.0
    while time.monotonic() < deadline:
        joined = sum(scrape(p, "stream_infer_labels_total", status="joined") for p in ports[:2])
        early = sum(scrape(p, "stream_infer_labels_waiting", kind="early") for p in ports[:2])
        if joined >= k:
            break
        time.sleep(0.5)
    print(f"  labels after scaling: {joined:.0f} of {k} joined, {early:.0f} waiting for an event")
    assert joined == k
