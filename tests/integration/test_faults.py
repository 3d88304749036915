"""Faults: the broker frozen mid-stream."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from stream_infer.broker import EmbeddedBroker
from stream_infer.loadgen import OpenLoopProducer
from stream_infer.settings import bootstrap_for_tests, docker_requested
from tests.integration.conftest import Setup, good_events

FREEZE_S = 20.0


@pytest.fixture
def own_broker(tmp_path: Path) -> Any:
    if bootstrap_for_tests() or docker_requested():
        pytest.skip("freezes the broker process: only with the embedded broker")
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as broker:
        yield broker


def test_a_frozen_broker_stalls_workers_without_loss_and_they_catch_up(
    own_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    setup = Setup(own_broker.bootstrap_servers, tmp_path)
    try:
        setup.start_worker()
        n = 12_000
        producer = OpenLoopProducer(
            {"bootstrap.servers": own_broker.bootstrap_servers, "message.timeout.ms": 120_000},
            setup.topics.input,
            iter(good_events(n)),
            rate=600.0,
            count=n,
        ).start()
        reader = setup.consumer(setup.topics.predictions)
        before = setup.collect(setup.topics.predictions, until=2000, consumer=reader)
        assert len(before) >= 2000
        own_broker.pause()
        time.sleep(FREEZE_S)
        own_broker.resume()
        producer.join(120)
        assert producer.errors == 0
        rest = setup.collect_until_ids(
            setup.topics.predictions,
            {f"e-{i}" for i in range(n)} - {p["id"] for p in before},
            consumer=reader,
            timeout_s=120,
        )
        reader.close()
        ids = Counter(p["id"] for p in before + rest)
        assert len(ids) == n, f"{n - len(ids)} events lost across the freeze"
        assert setup.workers[0].poll() is None, "the worker must ride out a frozen broker"
        print(f"duplicates after a {FREEZE_S:.0f}s freeze: {sum(ids.values()) - n}")
    finally:
        setup.stop()
