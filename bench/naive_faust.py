"""The naive way: a faust-streaming agent that scores one event at a time.

    python -m bench.naive_faust TOPOLOGY

A regular faust app with its own aiokafka consumer and producer: an agent on the input topic
(raw bytes), for each event orjson-decode, a one-row float32 matrix, one model call (in the
agent, on the event loop), and ``await topic.send(...)`` of the prediction. This is how the
faust documentation's examples would be adapted to a model, and it is what stream-infer is
measured against.

The only settings changed from faust's defaults are the ones the embedded broker needs (a short
session timeout, see shared/BROKER.md) and the ones that keep runs apart (app id = the
topology's unique group id, no web server, no leader topic).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import faust
import numpy as np
import orjson
from faust.types import StreamT

from bench.model import load_serving_predictor
from stream_infer.inference.predictor import TorchPredictor
from stream_infer.settings import Topology, load_topology

log = logging.getLogger("bench.naive_faust")


def create_app(topo: Topology, predictor: TorchPredictor) -> faust.App:
    model = topo.models[0]
    app = faust.App(
        topo.group_id,  # faust's consumer group is its app id
        broker=f"kafka://{topo.kafka.bootstrap_servers.split(',')[0]}",
        broker_session_timeout=topo.kafka.session_timeout_ms / 1000,
        topic_partitions=topo.topics.partitions,
        topic_disable_leader=True,
        web_enabled=False,
        store="memory://",
        autodiscover=False,
        key_serializer="raw",
        value_serializer="raw",
    )
    source = app.topic(topo.topics.input, key_serializer="raw", value_serializer="raw")
    sink = app.topic(topo.prediction_topic(model), key_serializer="raw", value_serializer="raw")
    features = topo.features
    stamp = {"model": predictor.model, "version": predictor.version}

    @app.agent(source)
    async def score(stream: StreamT[Any]) -> None:
        async for event in stream.events():
            doc = orjson.loads(event.value)
            feats = doc["features"]
            x = np.array([[feats[name] for name in features]], dtype=np.float32)
            value = float(predictor.predict_many(x)[0])
            pred = {"id": doc["id"], "prediction": value, "ts": doc.get("ts"), **stamp}
            await sink.send(key=event.key, value=orjson.dumps(pred))

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.naive_faust", description=__doc__)
    parser.add_argument("topology", type=Path)
    parser.add_argument("--loglevel", default="warning")
    args = parser.parse_args(argv)
    topo = load_topology(args.topology)
    app = create_app(topo, load_serving_predictor(topo))
    worker = faust.Worker(app, loglevel=args.loglevel, quiet=True)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
