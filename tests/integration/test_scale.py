"""Scale-out on Kafka: 8 partitions, workers 1 -> 4 -> 2 under steady load, nothing lost."""

from __future__ import annotations

import itertools
import time
from collections import Counter
from typing import Any

from stream_infer.broker import free_port
from stream_infer.loadgen import OpenLoopProducer
from tests.integration.conftest import Setup, good_events, scrape

PARTITIONS = 8


def _settle(setup: Setup, ports: list[int], timeout_s: float = 120) -> list[float]:
    """Wait until the given workers together own every partition, each at least one."""
    deadline = time.monotonic() + timeout_s
    owned: list[float] = []
    while time.monotonic() < deadline:
        owned = [scrape(p, "stream_infer_assigned_partitions") for p in ports]
        if sum(owned) == PARTITIONS and all(owned):
            return owned
        time.sleep(0.5)
    raise AssertionError(f"not settled: {owned}\n" + setup.worker_logs())


def test_workers_scale_1_4_2_under_load_without_loss(make_setup: Any) -> None:
    setup = make_setup(topics={"partitions": PARTITIONS})
    ports = [free_port() for _ in range(4)]
    setup.start_worker(web_port=ports[0])
    _settle(setup, ports[:1])
    rate, n = 800.0, 32_000
    producer = OpenLoopProducer(
        {"bootstrap.servers": setup.bootstrap},
        setup.topics.input,
        iter(good_events(n)),
        rate=rate,
        count=n,
    ).start()
    phases = [(time.time(), 1)]
    time.sleep(8)
    for port in ports[1:]:
        setup.start_worker(web_port=port)
    owned4 = _settle(setup, ports)
    phases.append((time.time(), 4))
    time.sleep(8)
    for proc in setup.workers[2:]:
        proc.terminate()
    for proc in setup.workers[2:]:
        assert proc.wait(60) == 0
    owned2 = _settle(setup, ports[:2])
    phases.append((time.time(), 2))
    producer.join(120)
    assert producer.sent == n
    preds = setup.collect_until_ids(
        setup.topics.predictions, {f"e-{i}" for i in range(n)}, timeout_s=180
    )
    ids = Counter(p["id"] for p in preds)
    assert len(ids) == n, f"{n - len(ids)} events lost while scaling"
    phases.append((max(p["served_at"] for p in preds), 0))
    for (start, workers), (end, _) in itertools.pairwise(phases):
        served = sum(1 for p in preds if start <= p["served_at"] < end)
        print(
            f"{workers} worker(s): {served / (end - start):,.0f} predictions/s "
            f"over {end - start:.0f}s (offered {rate:,.0f}/s)"
        )
    print(
        f"partitions owned: 4 workers {owned4}, 2 workers {owned2}; "
        f"duplicates {sum(ids.values()) - n}"
    )
