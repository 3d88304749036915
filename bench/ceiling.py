"""The ceiling: the least work that serves the model over Kafka, written plainly.

    python -m bench.ceiling TOPOLOGY [--batch 512] [--max-wait-ms 10]

One loop, one thread: consume up to ``--batch`` records (consume returns when it has them or
after ``--max-wait-ms``), decode each with orjson, build one float32 matrix, one forward pass of
the topology's serving model, encode one orjson prediction per event, produce them, flush (wait
until the broker acknowledged every one), then commit the batch's offsets synchronously.

No micro-batcher, no executor, no dead letters, no metrics, no routing: it is the ceiling for
this model on this broker and machine, not a product. Malformed events are skipped.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from types import FrameType

import numpy as np
import orjson
from confluent_kafka import Consumer, Producer, TopicPartition

from bench.model import load_serving_predictor
from stream_infer.settings import Topology, load_topology

log = logging.getLogger("bench.ceiling")


def serve(topo: Topology, *, batch: int, max_wait_s: float, stop: threading.Event) -> int:
    """Serve until ``stop`` is set. Returns the number of events served."""
    predictor = load_serving_predictor(topo)
    kafka = topo.kafka
    consumer = Consumer(
        {
            "bootstrap.servers": kafka.bootstrap_servers,
            "group.id": topo.group_id,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": kafka.session_timeout_ms,
            # librdkafka's default is 500 ms, and tansu answers a fetch that found no data
            # only when this expires, even if data arrives meanwhile: 10 ms, as stream-infer.
            "fetch.wait.max.ms": 10,
        }
    )
    producer = Producer(
        {"bootstrap.servers": kafka.bootstrap_servers, "acks": "all", "linger.ms": 1}
    )
    out_topic = topo.prediction_topic(topo.models[0])
    features = topo.features
    stamp = {"model": predictor.model, "version": predictor.version}
    served = 0
    consumer.subscribe([topo.topics.input])
    try:
        while not stop.is_set():
            msgs = consumer.consume(num_messages=batch, timeout=max_wait_s)
            if not msgs:
                continue
            docs, keys, rows = [], [], []
            offsets: dict[tuple[str, int], int] = {}
            for msg in msgs:
                if msg.error() is not None:
                    continue
                topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
                assert topic is not None and partition is not None and offset is not None
                offsets[(topic, partition)] = offset + 1
                try:
                    doc = orjson.loads(msg.value() or b"")
                    feats = doc["features"]
                    rows.append([feats[name] for name in features])
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    continue
                docs.append(doc)
                keys.append(msg.key())
            if rows:
                values = predictor.predict_many(np.array(rows, dtype=np.float32)).tolist()
                for doc, key, value in zip(docs, keys, values, strict=True):
                    pred = {"id": doc["id"], "prediction": value, "ts": doc.get("ts"), **stamp}
                    producer.produce(out_topic, orjson.dumps(pred), key)
                producer.flush()
                served += len(rows)
            if offsets:
                consumer.commit(
                    offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                    asynchronous=False,
                )
    finally:
        producer.flush(10)
        consumer.close()
    return served


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling", description=__doc__)
    parser.add_argument("topology", type=Path)
    parser.add_argument("--batch", type=int, default=512, help="records per consume()")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="consume() timeout")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    topo = load_topology(args.topology)
    stop = threading.Event()

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    served = serve(topo, batch=args.batch, max_wait_s=args.max_wait_ms / 1000, stop=stop)
    log.info("stopped after serving %d events", served)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
