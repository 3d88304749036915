"""A batch's part on the inference thread: serve it, publish what it makes, hand it to learning.

Only the inference thread runs it (:meth:`~stream_infer.runtime.threads.Threads.on_inference`),
one batch at a time, in the order the batches were handed out: the batch's label records are
split off; the pipeline (decode, route, infer, encode) serves the rest by the models' current
snapshot; every record it makes (predictions, shadow predictions, dead letters, invalid labels'
dead letters) is published under the batch's ticket (exactly_once: in the batch's transaction,
with its input offsets); the events scored and the labels decoded go to the learning thread,
under exactly_once only once the transaction committed (an aborted batch is served again: its
labels are learnt once). The event loop's part of a batch (its metrics, its commit) is
:class:`~stream_infer.runtime.batches.BatchHandler`'s.
"""

from __future__ import annotations

import functools

from stream_infer.core.events import BatchResult
from stream_infer.core.pipeline import ModelOutput, Pipeline
from stream_infer.core.serde import FeatureDecoder
from stream_infer.io.publisher import Ticket
from stream_infer.io.source import SourceBatch
from stream_infer.runtime.kafka import KafkaClients
from stream_infer.runtime.learning import LearningService
from stream_infer.runtime.models import Models
from stream_infer.settings import Topology


class InferenceStep:
    """The topology's pipeline, run on each batch by the models' snapshot of the moment.

    ``totals``: what it served so far (events, predictions, dead letters, batches), for the
    worker's periodic log line.
    """

    def __init__(
        self,
        topology: Topology,
        models: Models,
        kafka: KafkaClients,
        learning: LearningService | None,
    ) -> None:
        self.models = models
        self.kafka = kafka
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
        self.totals = {"events": 0, "predictions": 0, "dead_letters": 0, "batches": 0}

    def process(self, batch: SourceBatch, ticket: Ticket) -> BatchResult:
        """Serve ``batch``, publish its records under ``ticket``, hand it to learning."""
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
        learning = self.learning
        if learning is None:
            self.kafka.publish_batch(batch, result.records, ticket, _nothing)
        else:
            batch_rows = result.batch
            # Each scored event's input partition: the join tells a label lost to a rebalance.
            partitions = (
                [records[i].partition() or 0 for i in batch_rows.positions] if batch_rows else None
            )
            self.kafka.publish_batch(
                batch,
                result.records,
                ticket,
                functools.partial(learning.submit, batch_rows, result.scored, decoded, partitions),
            )
        self._count(result)
        return result

    def _count(self, result: BatchResult) -> None:
        self.totals["events"] += result.n_in
        self.totals["predictions"] += sum(result.served.values())
        self.totals["dead_letters"] += len(result.dead_letters)
        self.totals["batches"] += 1


def _nothing() -> None:
    """Nothing to do once a batch without learning is committed."""
