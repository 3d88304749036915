"""The serving loop's state, on the event loop side (no faust imports here).

Per batch: the pipeline (decode, route, infer, encode) and the produce calls run in one
dedicated executor thread, never on the event loop. The batch then waits, in order, for the
broker to acknowledge all its records; only then are its input offsets stored for commit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from stream_infer.events import BatchResult
from stream_infer.inference.device import select_device
from stream_infer.inference.predictor import Predictor, TorchPredictor
from stream_infer.io.clients import consumer_config, ensure_topics, producer_config
from stream_infer.io.publisher import Publisher, Ticket
from stream_infer.io.source import BatchSource, SourceBatch
from stream_infer.observability import Metrics
from stream_infer.pipeline import ModelOutput, Pipeline, Serving
from stream_infer.routing import Route
from stream_infer.serde import FeatureDecoder
from stream_infer.settings import Topology

log = logging.getLogger(__name__)


class InferenceRuntime:
    def __init__(self, topology: Topology, metrics: Metrics | None = None) -> None:
        self.topology = topology
        self.metrics = metrics or Metrics()
        self.device = select_device(topology.device)
        self.pipeline = Pipeline(
            FeatureDecoder(topology.features, topology.limits.max_event_bytes),
            [ModelOutput(m.name, topology.prediction_topic(m)) for m in topology.models],
            dead_letter_topic=topology.topics.dead_letter,
            shadow_topic=topology.topics.shadow,
        )
        self.serving = Serving(routes={}, predictors={})
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self.publisher: Publisher | None = None
        self.source: BatchSource | None = None
        self.ready = False
        self.started = asyncio.Event()
        self._commits: asyncio.Queue[tuple[SourceBatch, Ticket]] | None = None
        self.totals = {"events": 0, "predictions": 0, "dead_letters": 0, "batches": 0}

    # --- start and stop ----------------------------------------------------------------

    async def start(self, hand_off: Callable[[SourceBatch], None]) -> None:
        loop = asyncio.get_running_loop()
        self._commits = asyncio.Queue()
        await loop.run_in_executor(self.executor, self._prepare)
        topo = self.topology
        self.publisher = Publisher(
            producer_config(topo.kafka),
            on_retry=lambda topic, err: self.metrics.delivery_retries.labels(topic, err).inc(),
        )
        self.source = BatchSource(
            consumer_config(topo.kafka, topo.group_id),
            [topo.topics.input],
            max_batch_size=topo.batching.max_batch_size,
            max_wait_ms=topo.batching.max_wait_ms,
            max_in_flight=topo.batching.max_batches_in_flight,
            hand_off=hand_off,
        )
        self.source.start()
        self.ready = True
        self.metrics.ready.set(1)
        log.info(
            "serving %s on %s: input %s, batches of <= %d within %g ms",
            ", ".join(f"{m}={r.as_dict()['weights']}" for m, r in self.serving.routes.items()),
            self.device,
            topo.topics.input,
            topo.batching.max_batch_size,
            topo.batching.max_wait_ms,
        )

    def _prepare(self) -> None:
        """Blocking start-up work: topics, then models loaded and warmed up (executor thread)."""
        topo = self.topology
        torch.set_num_threads(topo.worker.inference_threads)
        ensure_topics(
            topo.kafka,
            topo.all_topics(),
            partitions=topo.topics.partitions,
            replication_factor=topo.topics.replication_factor,
        )
        predictors: dict[tuple[str, str], Predictor] = {}
        routes: dict[str, Route] = {}
        for model in topo.models:
            version = model.version(model.serving)
            assert version is not None  # the topology validator checked it
            _meta, predictor = TorchPredictor.load(
                version.path,
                model=model.name,
                version=version.version,
                features=topo.features,
                device=self.device,
            )
            predictor.warm_up()
            predictors[(model.name, version.version)] = predictor
            routes[model.name] = Route.single(version.version)
        self.serving = Serving(routes=routes, predictors=predictors, changed_at=time.time())
        self.metrics.set_routes({m: dict(r.weights) for m, r in routes.items()})

    async def stop(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        loop = asyncio.get_running_loop()
        if self.source is not None:
            await loop.run_in_executor(None, self.source.stop)
        if self.publisher is not None:
            await loop.run_in_executor(None, self.publisher.close)
        self.executor.shutdown(wait=False, cancel_futures=True)

    # --- per batch -----------------------------------------------------------------------

    async def handle(self, batch: SourceBatch) -> None:
        """Process and publish one batch, then queue it for in-order commit."""
        assert self._commits is not None
        loop = asyncio.get_running_loop()
        self.metrics.queue_wait_seconds.observe(time.monotonic() - batch.closed_at)
        ticket = Ticket(loop)
        started = time.perf_counter()
        result = await loop.run_in_executor(self.executor, self._process, batch, ticket)
        self.metrics.observe_batch(result, time.perf_counter() - started)
        self._count(result)
        await self._commits.put((batch, ticket))

    def _process(self, batch: SourceBatch, ticket: Ticket) -> BatchResult:
        assert self.publisher is not None
        result = self.pipeline.process(batch.records, self.serving)
        self.publisher.publish(result.records, ticket)
        return result

    def _count(self, result: BatchResult) -> None:
        self.totals["events"] += result.n_in
        self.totals["predictions"] += sum(result.served.values())
        self.totals["dead_letters"] += len(result.dead_letters)
        self.totals["batches"] += 1

    async def commit_in_order(self) -> None:
        """Forever: wait for each batch's delivery, in order, then store its offsets."""
        assert self._commits is not None and self.source is not None
        while True:
            batch, ticket = await self._commits.get()
            await ticket.delivered()
            self.metrics.delivery_seconds.observe(time.monotonic() - ticket.sent_at)
            self.source.done(batch)
            self.metrics.in_flight.set(self.source.in_flight)
