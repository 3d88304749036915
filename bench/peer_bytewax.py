"""A peer: Bytewax with its Kafka connector, batching its way, serving the same model.

    python -m bench.peer_bytewax TOPOLOGY [--batching flat_map_batch|collect]
                                          [--batch 1000] [--max-wait-ms 10]

The dataflow: ``kop.input`` (bytewax.connectors.kafka.operators: one librdkafka consumer per
input partition, ``consume(batch_size, 1 ms)`` per poll), then one forward pass per batch, then
``kop.output`` (``KafkaSink``: produce every record of a batch, then ``flush()``: each batch waits
for its acknowledgements; librdkafka's default ``acks=all``, written out here). Broker, topics,
features and model come from the per-run topology file, as for bench/ceiling.py; the prediction
is the ceiling's JSON (id, prediction, ts, model, version), keyed by the event's key.

Batching, ``--batching``:

- ``flat_map_batch`` (the default, Bytewax's best here): ``op.flat_map_batch`` over the Kafka
  input's poll batches (up to ``--batch`` records of one partition per poll), one forward pass
  per batch. No extra buffering, no timer: the batch is what the consumer already had.
- ``collect``: ``op.key_on`` one key, then ``op.collect(timeout=--max-wait-ms,
  max_size=--batch)``, one forward pass per collected list: Bytewax's documented "size or
  timeout" batcher (a keyed, stateful operator that routes every record through one key).

Guarantees: Bytewax's Kafka source assigns partitions itself (``group.id`` is
``BYTEWAX_IGNORED``, ``enable.auto.commit`` false) and never commits offsets to Kafka; its
resume position is the dataflow's recovery snapshot. Without recovery configured (as here, and
as its quick-start runs), a restart starts again from ``OFFSET_BEGINNING``: every event is
served again (at-least-once with the whole topic re-read), and nothing is lost only because
nothing is ever skipped. Malformed events (JSON that does not decode, a missing feature) are
skipped, as the ceiling does: no dead letter.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import orjson

from bench.model import load_serving_predictor
from stream_infer.settings import load_topology

log = logging.getLogger("bench.peer_bytewax")


def build_flow(topology: Path, *, batching: str, batch: int, max_wait_ms: float) -> Any:
    import bytewax.operators as op
    from bytewax.connectors.kafka import KafkaSinkMessage
    from bytewax.connectors.kafka import operators as kop
    from bytewax.dataflow import Dataflow

    topo = load_topology(topology)
    predictor = load_serving_predictor(topo)
    features = topo.features
    stamp = {"model": predictor.model, "version": predictor.version}
    brokers = [topo.kafka.bootstrap_servers]

    def score(msgs: Iterable[Any]) -> list[Any]:
        docs, keys, rows = [], [], []
        for msg in msgs:
            try:
                doc = orjson.loads(msg.value or b"")
                feats = doc["features"]
                rows.append([feats[name] for name in features])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue
            docs.append(doc)
            keys.append(msg.key)
        if not rows:
            return []
        values = predictor.predict_many(np.array(rows, dtype=np.float32)).tolist()
        return [
            KafkaSinkMessage(
                key,
                orjson.dumps({"id": doc["id"], "prediction": v, "ts": doc.get("ts"), **stamp}),
            )
            for doc, key, v in zip(docs, keys, values, strict=True)
        ]

    flow = Dataflow("bench-bytewax")
    source = kop.input(
        "in",
        flow,
        brokers=brokers,
        topics=[topo.topics.input],
        batch_size=batch,
        # The ceiling's 10 ms max wait (tansu answers an empty fetch only when it expires).
        add_config={"fetch.wait.max.ms": "10"},
    )
    if batching == "flat_map_batch":
        predictions = op.flat_map_batch("score", source.oks, score)
    elif batching == "collect":
        keyed = op.key_on("one_key", source.oks, lambda _msg: "all")
        lists = op.collect(
            "batch", keyed, timeout=timedelta(milliseconds=max_wait_ms), max_size=batch
        )
        predictions = op.flat_map("score", lists, lambda key_msgs: score(key_msgs[1]))
    else:
        msg = f"unknown --batching {batching!r}"
        raise SystemExit(msg)
    kop.output(
        "out",
        predictions,
        brokers=brokers,
        topic=topo.prediction_topic(topo.models[0]),
        add_config={"acks": "all"},
    )
    log.info("bytewax (%s) serving %s:%s", batching, predictor.model, predictor.version)
    return flow


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peer_bytewax", description=__doc__)
    parser.add_argument("topology", type=Path)
    parser.add_argument(
        "--batching", choices=("flat_map_batch", "collect"), default="flat_map_batch"
    )
    parser.add_argument("--batch", type=int, default=1000, help="records per poll / collect")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="collect's timeout")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        from bytewax.run import cli_main
    except ImportError as exc:
        print(
            f"bench.peer_bytewax: Bytewax is not installed ({exc}): "
            ".venv/bin/pip install -e '.[peers]'",
            file=sys.stderr,
        )
        return 2
    flow = build_flow(
        args.topology, batching=args.batching, batch=args.batch, max_wait_ms=args.max_wait_ms
    )

    from bytewax.errors import BytewaxRuntimeError

    stopping = threading.Event()

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        # Bytewax has no stop call; like Ctrl-C, a KeyboardInterrupt ends cli_main (wrapped in
        # a BytewaxRuntimeError when it lands inside a step, e.g. the source's consume call).
        # Each sink batch was flushed (acknowledged) before the next one started.
        stopping.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        cli_main(flow, workers_per_process=1)
    except (KeyboardInterrupt, BytewaxRuntimeError):
        if not stopping.is_set():
            raise
    log.info("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
