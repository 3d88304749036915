"""How docs/backtest-example.png was made: two hours of phishing traffic produced, with
producer timestamps, to a fresh Apache Kafka, then `stream-infer backtest` run on it.

    .venv/bin/python docs/backtest_example.py [OUT_DIR]   # default: a temporary folder

Needs Java 17+ and Maven (Apache Kafka is resolved from Maven Central) and matplotlib. About a
minute on two cores: the broker's start, 40 k records, the backtest itself (about 2 s).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
from confluent_kafka import Producer

from stream_infer.examples import phishing
from stream_infer.io.clients import ensure_topology_topics
from stream_infer.local.apache_kafka import KafkaCluster
from stream_infer.settings import load_topology

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGY = ROOT / "topologies" / "phishing.yaml"
HOURS = 2
RATE = 3.0  # events per second, on average (Poisson arrivals)
LABELLED = 0.85  # the share of events whose label comes
LABEL_DELAY_MS = (1_000, 120_000)
MALFORMED = 0.005


def traffic(start_ms: int, end_ms: int, seed: int = 1) -> tuple[list[tuple[int, str, bytes]], ...]:
    """(timestamp ms, key, value) of the events and of their labels, each in time order."""
    rng = random.Random(seed)
    rows = phishing.events(seed=3)
    events, labels = [], []
    t = start_ms
    while True:
        t += int(rng.expovariate(RATE) * 1000) + 1
        if t >= end_ms:
            break
        event_id, features, label = next(rows)
        if rng.random() < MALFORMED:  # one feature of nine: dead-lettered (missing_feature)
            bad = {"id": event_id, "features": {"https": "yes"}}
            events.append((t, event_id, orjson.dumps(bad)))
            continue
        events.append((t, event_id, orjson.dumps({"id": event_id, "features": features})))
        if rng.random() < LABELLED:
            late = t + rng.randint(*LABEL_DELAY_MS)
            if late < end_ms:
                labels.append((late, event_id, orjson.dumps({"id": event_id, "label": label})))
    return events, sorted(labels)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir, KafkaCluster(1, workdir=Path(workdir)) as kafka:
        override = {"STREAM_INFER_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers}
        topology = load_topology(TOPOLOGY, env=override)
        ensure_topology_topics(topology)
        now_ms = int(time.time() * 1000)
        events, labels = traffic(now_ms - HOURS * 3600 * 1000, now_ms)
        producer = Producer({"bootstrap.servers": kafka.bootstrap_servers, "linger.ms": 20})
        for topic, items in ((topology.topics.input, events), (topology.topics.labels, labels)):
            for ts, key, value in items:
                producer.produce(topic, value, key.encode(), timestamp=ts)
                producer.poll(0)
        if producer.flush(60):
            sys.exit("not every record was delivered")
        sys.stderr.write(f"produced {len(events)} events and {len(labels)} labels\n")
        command = [sys.executable, "-m", "stream_infer", "backtest", str(TOPOLOGY)]
        command += ["--version", "v2", "--since", f"{HOURS}h"]
        command += ["--out", str(out / "report.json"), "--plot", str(out / "backtest-example.png")]
        subprocess.run(command, env=os.environ | override, check=True, cwd=ROOT)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="backtest-")))
