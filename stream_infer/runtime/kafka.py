"""This worker's Kafka clients: the control log, the publisher and the batch source.

Made at start (:meth:`KafkaClients.prepare` on a thread, then :meth:`KafkaClients.open` on the
event loop), closed at stop by the worker; each is None before it is made. What Kafka refuses
this worker (missing ACLs), whether the input and labels topics are still partitioned alike and
whether the cluster can be reached (every client's ``error_cb``) are recorded here for /healthz
and /readyz.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence

from confluent_kafka import KafkaError, Message

from stream_infer.core.events import OutRecord
from stream_infer.io.access import AccessRefusals
from stream_infer.io.clients import (
    consumer_config,
    copartition_problem,
    ensure_topology_topics,
    exactly_once_consumer_config,
    output_max_message_bytes,
    producer_batch_bytes,
    producer_config,
    transactional_producer_config,
)
from stream_infer.io.control_log import ControlLog
from stream_infer.io.publisher import Publisher, Ticket
from stream_infer.io.reachability import Reachability
from stream_infer.io.source import BatchSource, SourceBatch
from stream_infer.io.transactions import TransactionalPublisher
from stream_infer.observability import Metrics
from stream_infer.runtime.undeliverable import Undeliverable
from stream_infer.settings import Topology

log = logging.getLogger(__name__)

_STAGES = ("begin", "produce", "send_offsets", "commit", "abort")
_OUTCOMES = ("committed", "aborted", "skipped")


class KafkaClients:
    """``worker_id``: names the transactional producer (exactly_once) when ``worker.id`` is
    not set."""

    def __init__(self, topology: Topology, metrics: Metrics, worker_id: str = "worker") -> None:
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
        # exactly_once: the batches' records go through it, in transactions (acks and drift
        # events still go through the publisher).
        self.transactions: TransactionalPublisher | None = None
        self._worker_id = worker_id
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
        if topo.processing.exactly_once:
            self.transactions = self._transactional_publisher()
        return self.control_log.replay()

    def _transactional_publisher(self) -> TransactionalPublisher:
        """exactly_once: the transactional producer, registered with the cluster (blocking)."""
        topo, metrics = self.topology, self.metrics
        conf = transactional_producer_config(
            topo.kafka,
            # Without worker.id: unique even where containers share a host name and a pid
            # (host networking, PID 1), at the price of a predecessor's open transaction
            # waiting out kafka.transaction_timeout_ms after a restart.
            topo.transactional_id(f"{self._worker_id}-{uuid.uuid4().hex[:8]}"),
            error_cb=self._error_cb("transactional producer"),
        )
        self._fit_batches(conf)
        stages = {s: metrics.transaction_seconds.labels(s) for s in _STAGES}
        outcomes = {o: metrics.transactions.labels(o) for o in _OUTCOMES}
        transactions = TransactionalPublisher(
            conf,
            transaction_timeout_s=topo.kafka.transaction_timeout_ms / 1000.0,
            undeliverable=self.undeliverable,
            max_message_bytes=self._max_message_bytes,
            on_stage=lambda stage, seconds: stages[stage].observe(seconds),
            on_outcome=lambda outcome: outcomes[outcome].inc(),
        )
        transactions.init()
        return transactions

    def _fit_batches(self, conf: dict[str, object]) -> None:
        if batch_bytes := producer_batch_bytes(conf, self._max_message_bytes):
            # A batch over a topic's max.message.bytes is refused whole, every record in it.
            log.info(
                "producer batch.size %d: under the output topics' max.message.bytes", batch_bytes
            )
            conf["batch.size"] = batch_bytes

    def open(
        self,
        hand_off: Callable[[SourceBatch], None],
        on_assignment: Callable[[list[tuple[str, int]]], None],
    ) -> None:
        """The publisher and the batch source (not started: it consumes once started)."""
        topo = self.topology
        conf = producer_config(topo.kafka, error_cb=self._error_cb("producer"))
        self._fit_batches(conf)
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
        eos = topo.processing.exactly_once
        source = self.source = BatchSource(
            consumer_config(
                topo.kafka,
                topo.group_id,
                error_cb=self._error_cb("consumer"),
                **(exactly_once_consumer_config() if eos else {}),
            ),
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
            exactly_once=eos,
        )
        if self.transactions is not None:
            self.transactions.start(source)
        # Read at scrape time: the batches handed over and not yet done, as they are now.
        self.metrics.in_flight.set_function(lambda: source.in_flight)

    def _error_cb(self, client: str) -> Callable[[KafkaError], None]:
        """A client's librdkafka ``error_cb``: every broker down is an outage."""
        return self.reachability.error_cb(f"the {client}")

    def publish_batch(
        self,
        batch: SourceBatch,
        records: Sequence[OutRecord],
        ticket: Ticket,
        after_commit: Callable[[], object],
    ) -> None:
        """A served batch's records, under its ticket (inference thread). ``after_commit``
        runs once they count: under exactly_once after the batch's transaction committed
        (never for an aborted one, which is served again), else at once."""
        if self.transactions is not None:
            self.transactions.submit(batch, records, ticket, after_commit)
            return
        assert self.publisher is not None
        self.publisher.publish(records, ticket)
        after_commit()

    @property
    def oldest_unacked_s(self) -> float:
        """How long the oldest batch (or ack) not yet acknowledged, or the transaction in
        progress, has waited."""
        waits = [p.oldest_unacked_s for p in (self.publisher, self.transactions) if p is not None]
        return max(waits, default=0.0)

    @property
    def delivery_problem(self) -> str | None:
        """Why deliveries can never complete (a publisher's thread dead, a record nothing can
        take, the transactional producer fenced)."""
        if self.publisher is not None and (problem := self.publisher.problem):
            return problem
        return self.transactions.problem if self.transactions is not None else None

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
