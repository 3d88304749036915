"""This worker's Kafka clients: the control log, the publisher and the batch source.

Made at start (:meth:`KafkaClients.prepare` on a thread, then :meth:`KafkaClients.open` on the
event loop), closed at stop by the worker; each is None before it is made. What Kafka refuses
this worker (missing ACLs), whether the input and labels topics are still partitioned alike and
whether the cluster can be reached (every client's ``error_cb``) are recorded here for /healthz
and /readyz.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from confluent_kafka import KafkaError, Message

from stream_infer.core.events import OutRecord
from stream_infer.io.access import AccessRefusals
from stream_infer.io.clients import (
    consumer_config,
    copartition_problem,
    ensure_topology_topics,
    output_max_message_bytes,
    producer_batch_bytes,
    producer_config,
)
from stream_infer.io.control_log import ControlLog
from stream_infer.io.publisher import Publisher, Ticket
from stream_infer.io.reachability import Reachability
from stream_infer.io.source import BatchSource, SourceBatch
from stream_infer.observability import Metrics
from stream_infer.runtime.undeliverable import Undeliverable
from stream_infer.settings import Topology

log = logging.getLogger(__name__)


class KafkaClients:
    def __init__(self, topology: Topology, metrics: Metrics) -> None:
        self.topology = topology
        self.metrics = metrics
        # Topics and groups Kafka refuses this worker (missing ACLs): health problems.
        self.access = AccessRefusals()
        # Whether any broker answers: told by every client (their error_cb, their answers).
        self.reachability = Reachability()
        metrics.access_refused.set_function(lambda: len(self.access))
        self.labels_topic = topology.topics.labels if topology.online.enabled else None
        # Set when the input and labels topics stop being partitioned alike (a partition added
        # to one of them while the worker runs): the label join breaks, serving does not.
        self.copartition_problem: str | None = None
        self.undeliverable = Undeliverable(
            topology.topics.dead_letter,
            topology.limits.max_dead_letter_bytes,
            lambda reason: metrics.dead_letters.labels(reason).inc(),
        )
        self.control_log: ControlLog | None = None
        self.publisher: Publisher | None = None
        self.source: BatchSource | None = None
        self._max_message_bytes: dict[str, int] = {}  # output topics' max.message.bytes

    def prepare(self) -> list[Message]:
        """Blocking (a thread): the topology's topics made, the output topics' limits read, the
        control log opened; returns the control log replayed to its end."""
        topo = self.topology
        ensure_topology_topics(topo)
        self._max_message_bytes = output_max_message_bytes(topo)
        self.control_log = ControlLog(
            consumer_config(topo.kafka, "unused", error_cb=self._error_cb("control log")),
            topo.topics.control,
            access=self.access,
            reachability=self.reachability,
        )
        return self.control_log.replay()

    def open(
        self,
        hand_off: Callable[[SourceBatch], None],
        on_assignment: Callable[[list[tuple[str, int]]], None],
    ) -> None:
        """The publisher and the batch source (not started: it consumes once started)."""
        topo = self.topology
        conf = producer_config(topo.kafka, error_cb=self._error_cb("producer"))
        if batch_bytes := producer_batch_bytes(conf, self._max_message_bytes):
            # A batch over a topic's max.message.bytes is refused whole, every record in it.
            log.info(
                "producer batch.size %d: under the output topics' max.message.bytes", batch_bytes
            )
            conf["batch.size"] = batch_bytes
        self.publisher = Publisher(
            conf,
            on_retry=lambda topic, err: self.metrics.delivery_retries.labels(topic, err).inc(),
            undeliverable=self.undeliverable,
            access=self.access,
            max_message_bytes=self._max_message_bytes,
            reachability=self.reachability,
        )
        # Labels come through the same group as the events: with the same partition count and
        # the same keys, partition i of both lands on the same worker (co-partitioned join).
        inputs = [topo.topics.input] + ([self.labels_topic] if self.labels_topic else [])
        source = self.source = BatchSource(
            consumer_config(topo.kafka, topo.group_id, error_cb=self._error_cb("consumer")),
            inputs,
            max_batch_size=topo.batching.max_batch_size,
            max_wait_ms=topo.batching.max_wait_ms,
            max_in_flight=topo.batching.max_batches_in_flight,
            hand_off=hand_off,
            on_assignment=on_assignment,
            on_backpressure=self.metrics.source_backpressure_seconds.inc,
            on_partition_counts=self._partitions_changed,
            on_fetch_delay=self.metrics.fetch_delay_seconds.observe,
            access=self.access,
            reachability=self.reachability,
            # The other topics it needs: one that vanishes is a /healthz problem.
            watched=[t for t in topo.all_topics() if t not in inputs],
        )
        # Read at scrape time: the batches handed over and not yet done, as they are now.
        self.metrics.in_flight.set_function(lambda: source.in_flight)

    def _error_cb(self, client: str) -> Callable[[KafkaError], None]:
        """A client's librdkafka ``error_cb``: every broker down is an outage."""
        return self.reachability.error_cb(f"the {client}")

    def publish_untracked(self, records: list[OutRecord]) -> None:
        """Drift events, policy commands, acks: delivered with retries, but no input offset
        waits on them."""
        if self.publisher is not None and records:
            self.publisher.publish(records, Ticket(None))

    def _partitions_changed(self, counts: dict[str, int]) -> None:
        """The consumer thread saw new partition counts: is the label join still possible?"""
        if self.labels_topic is None:
            return
        problem = copartition_problem(counts, self.topology.topics.input, self.labels_topic)
        if problem and problem != self.copartition_problem:
            log.error("labels cannot be joined any more: %s", problem)
        elif self.copartition_problem and not problem:
            log.warning("the input and labels topics are partitioned alike again")
        self.copartition_problem = problem
