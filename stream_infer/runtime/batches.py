"""The per-batch path: one micro-batch from the source to the commit queue.

A batch's label records are split off (for the learning thread); the pipeline (decode,
route, infer, encode) and the produce calls run on the inference thread, never on the event
loop; the records are published under the batch's ticket, and the batch joins
:class:`~stream_infer.runtime.commits.OrderedCommits`, which commits it once they are
delivered. A batch that raises fails there before the exception goes on (to stop the worker).
"""

from __future__ import annotations

import functools
import logging
import time

from stream_infer.core.events import BatchResult
from stream_infer.core.pipeline import ModelOutput, Pipeline
from stream_infer.core.serde import FeatureDecoder
from stream_infer.io.publisher import Ticket
from stream_infer.io.source import SourceBatch
from stream_infer.observability import Metrics
from stream_infer.runtime.commits import OrderedCommits
from stream_infer.runtime.kafka import KafkaClients
from stream_infer.runtime.learning import LearningService
from stream_infer.runtime.models import Models
from stream_infer.runtime.threads import Threads
from stream_infer.settings import Topology

log = logging.getLogger(__name__)


class BatchHandler:
    """Serves each batch by the models' current snapshot and queues it for commit."""

    def __init__(
        self,
        topology: Topology,
        metrics: Metrics,
        models: Models,
        kafka: KafkaClients,
        threads: Threads,
        learning: LearningService | None,
    ) -> None:
        self.metrics = metrics
        self.models = models
        self.kafka = kafka
        self.threads = threads
        self.learning = learning
        self.pipeline = Pipeline(
            FeatureDecoder(topology.features, topology.limits.max_event_bytes),
            [ModelOutput(m.name, topology.prediction_topic(m)) for m in topology.models],
            dead_letter_topic=topology.topics.dead_letter,
            shadow_topic=topology.topics.shadow,
            track_scores=topology.online.enabled,
            watchdog=models.watchdog,
            max_dead_letter_bytes=topology.limits.max_dead_letter_bytes,
        )
        self.commits = OrderedCommits(kafka, metrics.delivery_seconds.observe)
        self.totals = {"events": 0, "predictions": 0, "dead_letters": 0, "batches": 0}

    async def handle(self, batch: SourceBatch) -> None:
        """Process and publish one batch, then queue it for in-order commit.

        Once a batch failed, later batches (taken by an agent restarted during shutdown) are
        skipped: not served, never marked done. A batch that raises fails in the checkpoint
        before the exception goes on (to stop the worker)."""
        if self.commits.failure is not None:
            log.debug("batch %d skipped: an earlier batch failed", batch.seq)
            return
        if batch.opened_at is not None:
            self.metrics.batching_seconds.observe(batch.closed_at - batch.opened_at)
        self.metrics.queue_wait_seconds.observe(time.monotonic() - batch.closed_at)
        ticket = self.commits.ticket()
        started = time.perf_counter()
        try:
            result = await self.threads.on_inference(
                functools.partial(self._process, batch, ticket)
            )
            self.metrics.observe_batch(result, time.perf_counter() - started)
            self.metrics.observe_latency(result.event_ts, time.time())
            self._count(result)
        except Exception as exc:  # not a cancellation: an unserved batch is never done anyway
            self.commits.fail(batch, f"cannot serve it: {exc!r}")
            raise
        await self.commits.add(batch, ticket)

    def _process(self, batch: SourceBatch, ticket: Ticket) -> BatchResult:
        """The inference thread's part: serve, publish under ``ticket``, hand to learning."""
        publisher = self.kafka.publisher
        assert publisher is not None
        records, labels = batch.records, []
        labels_topic = self.kafka.labels_topic
        if labels_topic is not None:
            labels = [r for r in records if r.topic() == labels_topic]
            if labels:
                records = [r for r in records if r.topic() != labels_topic]
        result = self.pipeline.process(records, self.models.snapshot)
        decoded: list[tuple[str, float]] = []
        if labels and self.learning is not None:
            # Invalid labels are dead letters of this batch: its offsets wait for them.
            decoded, invalid = self.learning.split_labels(labels)
            result.dead_letters.extend(invalid)
            result.records.extend(self.pipeline.dead_letter_records(invalid))
        publisher.publish(result.records, ticket)
        if self.learning is not None:
            batch_rows = result.batch
            # Each scored event's input partition: the join tells a label lost to a rebalance.
            partitions = (
                [records[i].partition() or 0 for i in batch_rows.positions] if batch_rows else None
            )
            self.learning.submit(batch_rows, result.scored, decoded, partitions)
        return result

    def _count(self, result: BatchResult) -> None:
        self.totals["events"] += result.n_in
        self.totals["predictions"] += sum(result.served.values())
        self.totals["dead_letters"] += len(result.dead_letters)
        self.totals["batches"] += 1
