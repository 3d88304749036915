"""A peer: Quix Streams, written the way its docs teach, serving the same model.

    python -m bench.peer_quix TOPOLOGY

``Application(broker_address, consumer_group, auto_offset_reset="earliest")``,
``sdf = app.dataframe(input_topic)``, ``sdf.apply(score)`` (one event, one forward pass at batch
1), ``sdf.to_topic(prediction_topic)``, ``app.run()``. The broker, topics, consumer group,
features and model come from the per-run topology file, as for bench/ceiling.py; the prediction
is the ceiling's JSON (id, prediction, ts, model, version), keyed by the event's key.

Quix Streams' own defaults are kept: values deserialized and serialized as JSON by Quix, keys
as bytes; the producer idempotent (``enable.idempotence``, hence ``acks=all``, as ours); offsets
committed at a checkpoint every 5 s (``commit_interval``), after the producer's flush (commit
after delivery, at-least-once). A malformed event (JSON that does not decode, or a missing
feature) raises in Quix's deserializer or in ``score``: the default error callbacks log it and
re-raise, so the application stops (no dead letter; a restart meets the same event again).
SIGTERM is Quix's own graceful stop (it installs the handler in ``app.run()``).

Quix Streams 3.28.1 requires confluent-kafka < 2.13 and pydantic < 2.14, older than the
project's, so it lives in its own folder (``.venv/peers-quix``, installed by ``python3 dev.py
setup`` with ``pip install --target``); this module puts that folder first on ``sys.path``
before anything imports confluent_kafka or pydantic, so Quix runs with the versions it
declares.
"""

from __future__ import annotations

import sys
from pathlib import Path

QUIX_TARGET = Path(sys.prefix) / "peers-quix"
if QUIX_TARGET.is_dir() and str(QUIX_TARGET) not in sys.path:
    sys.path.insert(0, str(QUIX_TARGET))

import argparse  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from bench.model import load_serving_predictor  # noqa: E402
from stream_infer.settings import load_topology  # noqa: E402

log = logging.getLogger("bench.peer_quix")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peer_quix", description=__doc__)
    parser.add_argument("topology", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        from quixstreams import Application
    except ImportError as exc:
        print(
            f"bench.peer_quix: Quix Streams is not installed ({exc}); run `python3 dev.py setup` "
            f"(it installs it into {QUIX_TARGET})",
            file=sys.stderr,
        )
        return 2
    topo = load_topology(args.topology)
    predictor = load_serving_predictor(topo)
    features = topo.features
    stamp = {"model": predictor.model, "version": predictor.version}

    def score(event: dict[str, Any]) -> dict[str, Any]:
        feats = event["features"]
        row = np.array([[feats[name] for name in features]], dtype=np.float32)
        value = predictor.predict_many(row).tolist()[0]
        return {"id": event["id"], "prediction": value, "ts": event.get("ts"), **stamp}

    # Quix makes a state directory even for a stateless dataframe (default: ./state): a
    # temporary one, removed when the app stops.
    state_dir = tempfile.mkdtemp(prefix="bench-quix-state-")
    app = Application(
        broker_address=topo.kafka.bootstrap_servers,
        state_dir=state_dir,
        consumer_group=topo.group_id,
        auto_offset_reset="earliest",
        # What the broker needs, as for every system: the session timeout of the topology, and
        # (tansu answers an empty fetch only when this expires) the ceiling's 10 ms max wait.
        consumer_extra_config={
            "session.timeout.ms": topo.kafka.session_timeout_ms,
            "fetch.wait.max.ms": 10,
        },
        loglevel="INFO",
    )
    events = app.topic(topo.topics.input, key_deserializer="bytes", value_deserializer="json")
    predictions = app.topic(
        topo.prediction_topic(topo.models[0]), key_serializer="bytes", value_serializer="json"
    )
    sdf = app.dataframe(events)
    sdf = sdf.apply(score)
    sdf.to_topic(predictions)
    log.info("quixstreams serving %s:%s", predictor.model, predictor.version)
    try:
        app.run()
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
