"""The operator's side of the control topic: send a command, collect every worker's answer.

Any Kafka client can do the same: produce the command's JSON to the control topic, read the
acks topic. This module is what ``stream-infer control`` uses.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition

from stream_infer.core.control import new_command_id, seal
from stream_infer.errors import BrokerError
from stream_infer.io.clients import (
    assign_partitions,
    groupless_consumer_config,
    missing_topics,
)
from stream_infer.io.watch import collect_acks
from stream_infer.settings import Topology


def new_command(command: str, **fields: Any) -> dict[str, Any]:
    """A command document with a fresh unique id (see :func:`new_command_id`)."""
    return {"id": new_command_id(), "command": command, **fields}


class Controller:
    """Sends commands to a topology's control topic and reads the acks topic."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        if topology.topics.acks is None:
            msg = "the topology declares no acks topic (topics.acks)"
            raise BrokerError(msg)
        self.acks_topic = topology.topics.acks
        # Never a topic as a side effect: a command produced to a missing control topic would
        # make the broker auto-create it with its default partitions and retention, and the
        # control log is the routing's only memory (one partition, never expires).
        missing = missing_topics(topology.kafka, [topology.topics.control, self.acks_topic])
        if missing:
            msg = (
                f"{' and '.join(missing)} {'does' if len(missing) == 1 else 'do'} not exist: "
                "create the topology's topics first (`stream-infer topics TOPOLOGY`, or start a "
                "worker, which creates them); nothing was sent"
            )
            raise BrokerError(msg)
        conf = topology.kafka.librdkafka()
        # Idempotent: a retried send must not write a command twice. No auto-creation either.
        self._producer = Producer(
            conf | {"acks": "all", "enable.idempotence": True, "allow.auto.create.topics": False}
        )
        self._acks = Consumer(groupless_consumer_config(conf, "ctl"))
        meta = self._acks.list_topics(self.acks_topic, timeout=10).topics[self.acks_topic]
        # From each partition's end as it is now (OFFSET_END would be looked up only at the
        # first fetch): an ack to a command sent after this is never skipped.
        assign_partitions(self._acks, {self.acks_topic: meta.partitions}, self._end_now)

    def _end_now(self, topic: str, partition: int) -> int:
        _low, high = self._acks.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
        return max(high, 0)

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
        return collect_acks(self._acks, command_id, wait_s=wait_s, workers=workers)

    def close(self) -> None:
        self._acks.close()
