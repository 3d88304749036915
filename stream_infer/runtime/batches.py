"""The per-batch path: one micro-batch from the source to the commit queue.

Two parts, one per thread. On the inference thread, never on the event loop,
:class:`~stream_infer.runtime.inference_step.InferenceStep` serves the batch (labels split off,
the pipeline: decode, route, infer, encode) and publishes its records under the batch's ticket.
On the event loop, :class:`BatchHandler` times the batch, sends it to that thread and queues it
in :class:`~stream_infer.runtime.commits.OrderedCommits`, which commits it once its records are
delivered. A batch that raises fails there before the exception goes on (to stop the worker).
"""

from __future__ import annotations

import functools
import logging
import time

from stream_infer.io.source import SourceBatch
from stream_infer.observability import Metrics
from stream_infer.runtime.commits import OrderedCommits
from stream_infer.runtime.inference_step import InferenceStep
from stream_infer.runtime.kafka import KafkaClients
from stream_infer.runtime.learning import LearningService
from stream_infer.runtime.models import Models
from stream_infer.runtime.threads import Threads
from stream_infer.settings import Topology

log = logging.getLogger(__name__)


class BatchHandler:
    """Serves each batch on the inference thread (``inference``) and queues it for commit
    (``commits``)."""

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
        self.kafka = kafka
        self.threads = threads
        self.inference = InferenceStep(topology, models, kafka, learning)
        self.commits = OrderedCommits(kafka, metrics.delivery_seconds.observe)

    async def handle(self, batch: SourceBatch) -> None:
        """Process and publish one batch, then queue it for in-order commit.

        Once a batch failed, later batches (taken by an agent restarted during shutdown) are
        skipped: not served, never marked done. A batch that raises fails in the checkpoint
        before the exception goes on (to stop the worker)."""
        if self.commits.failure is not None:
            log.debug("batch %d skipped: an earlier batch failed", batch.seq)
            return
        source = self.kafka.source
        if source is not None and batch.epoch < source.epoch:
            # exactly_once: read before a rewind; never committed, its records come again.
            source.dropped(batch)
            return
        if batch.opened_at is not None:
            self.metrics.batching_seconds.observe(batch.closed_at - batch.opened_at)
        self.metrics.queue_wait_seconds.observe(time.monotonic() - batch.closed_at)
        ticket = self.commits.ticket()
        started = time.perf_counter()
        try:
            result = await self.threads.on_inference(
                functools.partial(self.inference.process, batch, ticket)
            )
            self.metrics.observe_batch(result, time.perf_counter() - started)
            self.metrics.observe_latency(result.event_ts, time.time())
        except Exception as exc:  # not a cancellation: an unserved batch is never done anyway
            self.commits.fail(batch, f"cannot serve it: {exc!r}")
            raise
        await self.commits.add(batch, ticket)
