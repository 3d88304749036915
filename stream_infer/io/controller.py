"""The operator's side of the control topic: send a command, collect every worker's answer.

Any Kafka client can do the same: produce the command's JSON to the control topic, read the
acks topic. This module is what ``stream-infer control`` uses.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition

from stream_infer.core.control import seal
from stream_infer.errors import BrokerError
from stream_infer.io.clients import consume_ready
from stream_infer.settings import Topology


def new_command(command: str, **fields: Any) -> dict[str, Any]:
    """A command document with a fresh unique id."""
    return {"id": f"cmd-{uuid.uuid4().hex[:12]}", "command": command, **fields}


class Controller:
    """Sends commands to a topology's control topic and reads the acks topic."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        if topology.topics.acks is None:
            msg = "the topology declares no acks topic (topics.acks)"
            raise BrokerError(msg)
        self.acks_topic = topology.topics.acks
        conf = topology.kafka.librdkafka()
        # Idempotent: a retried send must not write a command twice.
        self._producer = Producer(conf | {"acks": "all", "enable.idempotence": True})
        self._acks = Consumer(
            conf | {"group.id": f"stream-infer-ctl-{uuid.uuid4().hex}", "enable.auto.commit": False}
        )
        meta = self._acks.list_topics(self.acks_topic, timeout=10).topics[self.acks_topic]
        parts = []
        for p in meta.partitions:
            _low, high = self._acks.get_watermark_offsets(
                TopicPartition(self.acks_topic, p), timeout=10
            )
            parts.append(TopicPartition(self.acks_topic, p, max(high, 0)))
        self._acks.assign(parts)

    def send(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Sign (when the topology has a key) and produce one command; return what was sent."""
        key = self.topology.control.hmac_key
        doc = seal(doc, key.get_secret_value().encode() if key else None, time.time())
        self._producer.produce(self.topology.topics.control, orjson.dumps(doc), str(doc["id"]))
        if self._producer.flush(10) != 0:
            msg = f"the command was not delivered to {self.topology.topics.control}"
            raise BrokerError(msg)
        return doc

    def acks(
        self, command_id: str | None, *, wait_s: float, workers: int | None = None
    ) -> list[dict[str, Any]]:
        """Acks for a command (all acks if None): until ``workers`` answered or ``wait_s``."""
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            for msg in consume_ready(self._acks, 100, 0.2):
                if msg.error() is not None:
                    continue
                ack = orjson.loads(msg.value() or b"{}")
                if command_id is None or ack.get("command_id") == command_id:
                    out.append(ack)
            if workers is not None and len({a["worker"] for a in out}) >= workers:
                break
        return out

    def close(self) -> None:
        self._acks.close()
