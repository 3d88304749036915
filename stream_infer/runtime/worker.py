"""One worker's runtime, on the event loop side (no faust imports here): its parts built,
started and stopped in order, and its health.

The parts, each in its own module::

    threads         the inference and loader threads, the bridges into the event loop
    kafka           the Kafka clients: control log, publisher, batch source
    models          the versions loaded, the routing snapshot they serve, the watchdog
    control_plane   the routing table, the control log applied to it, acks
    batches         the per-batch path on the event loop: timed, served, queued for commit
    inference_step  its part on the inference thread: pipeline, publish, hand to learning
    commits         commit after delivery, in order
    learning        online learning (labels, learners, drift), when the topology enables it

A batch that cannot be served (an exception on the serving path, or a record no retry delivers
and nothing else can take) fails: nothing after it is served, marked done or committed, and the
exception stops the worker, which restarts from the committed offsets.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import torch
from confluent_kafka import Message

from stream_infer.core.control import RolloutRecord
from stream_infer.io.source import SourceBatch
from stream_infer.observability import Metrics
from stream_infer.runtime.batches import BatchHandler
from stream_infer.runtime.control_plane import ControlPlane
from stream_infer.runtime.kafka import KafkaClients
from stream_infer.runtime.learning import LearningService
from stream_infer.runtime.models import Models
from stream_infer.runtime.threads import Threads, torch_threads
from stream_infer.settings import Topology

log = logging.getLogger(__name__)


class InferenceRuntime:
    def __init__(self, topology: Topology, metrics: Metrics | None = None) -> None:
        self.topology = topology
        self.metrics = metrics or Metrics()
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}"
        init_torch = torch_threads(topology.worker.inference_threads)
        self.threads = Threads(init_torch)
        self.kafka = KafkaClients(topology, self.metrics, self.worker_id)
        self.learning: LearningService | None = None
        if topology.online.enabled:
            self.learning = LearningService(
                topology,
                self.metrics,
                publish=self.kafka.publish_untracked,
                predictors=lambda: self.models.predictors,
                # The table's routes and generation, not what serves here (which may lag a
                # load): a policy command is judged against the table, on every worker.
                routes=lambda: self.control.table.routes,
                generation=lambda: self.control.table.generation,
                worker=topology.worker.id or socket.gethostname(),
                rollouts=self._rollouts,
                worker_id=self.worker_id,
            )
        self.models = Models(
            topology,
            self.metrics,
            make_learner=self.learning.learner_for if self.learning is not None else None,
            on_switch=self._serving_changed,
        )
        self.control = ControlPlane(
            topology,
            self.metrics,
            self.models,
            self.kafka,
            self.threads,
            worker_id=self.worker_id,
            on_reset=lambda model: self._serving_changed({model}),
            on_served=self._serve_once_loaded,
            rollout_driver=self._rollout_driver_view,
        )
        self.batches = BatchHandler(
            topology, self.metrics, self.models, self.kafka, self.threads, self.learning
        )
        self.ready = False
        self.started = asyncio.Event()
        self._source_started = False
        self._retry_task: asyncio.Task[None] | None = None
        # Read at scrape time: ready once started, and while the log's routing serves.
        self.metrics.ready.set_function(lambda: 1 if self.not_ready_reason is None else 0)

    def _serving_changed(self, models: set[str]) -> None:
        """What serves these models changed: their routes, or a learner of theirs was reset
        (loader thread). Their error starts afresh: so do their drift monitors."""
        if self.learning is not None:
            self.learning.serving_changed(models)

    def _rollouts(self) -> tuple[int, dict[str, RolloutRecord]]:
        """The table's generation and rollouts, read together from another thread (the loader
        thread moves them): the generation is read before and after the records, and the read
        is taken again if it moved, so the records are never older than the generation given
        (the table moves a rollout before it counts the generation)."""
        table = self.control.table
        before, records = table.generation, {}
        for _ in range(100):  # a command takes microseconds to apply: a few tries at most
            before = table.generation
            try:
                records = dict(table.rollouts)
            except RuntimeError:  # the dict changed while copied: read again
                continue
            if table.generation == before:
                break
        # After 100 moving reads (a flood of commands) the last one: a step decided from it
        # carries an older generation than the table's and is rejected stale, never misapplied.
        return before, records

    def _rollout_driver_view(self) -> dict[str, Any] | None:
        """The rollout driver's live view, when this worker drives a running rollout."""
        if self.learning is None:
            return None
        view = self.learning.rollout_driver.status()
        return view if view.get("driving") and view.get("rollouts") else None

    def _assigned(self, parts: list[tuple[str, int]]) -> None:
        """The consumer thread's assignment changed (after a revocation or an assignment)."""
        owned = [p for topic, p in parts if topic == self.topology.topics.input]
        self.metrics.assigned_partitions.set(len(owned))
        if self.learning is not None:
            self.learning.assigned(owned)

    # --- health ----------------------------------------------------------------------------

    def health_problems(self) -> list[str]:
        """Why this worker should be restarted (empty when it is healthy)."""
        problems = []
        models, source, kafka = self.models, self.kafka.source, self.kafka
        if models.problem is not None and models.out_of_memory:
            problems.append(
                f"out of memory loading what the control log routes ({models.problem}) "
                "while earlier versions are resident: a restart loads only what the log names"
            )
        if source is not None and source.error is not None:
            problems.append(f"the batch source failed: {source.error!r}")
        if source is not None and source.group_problem is not None:
            problems.append(source.group_problem)
        if source is not None and (vanished := source.vanished):
            problems.append(
                f"topics gone since this worker started (deleted, the broker lost its data, or "
                f"created anew, empty): {', '.join(vanished)}; a restart is needed even if they "
                "are back (it creates what is missing and rebuilds the routing from the control "
                "log as it is now)"
            )
        for model, version in models.watchdog.saturated():
            problems.append(
                f"{model}:{version} has {self.topology.limits.max_hung_calls} hung model calls; "
                "only a restart reclaims their threads"
            )
        if source is not None and source.failure is not None:
            problems.append(
                f"a batch failed ({source.failure}): nothing after it is committed; a "
                "restart serves it again"
            )
        if problem := kafka.delivery_problem:
            problems.append(problem)
        # A refused Write, or a cluster that cannot be reached, holds deliveries back: that is
        # a warning, not a stall (a restart mends neither). Only once the warning is shown
        # (past limits.unreachable_grace_s): one of the two is always reported. A refused Read
        # (the control log, an idle labels topic) says nothing of deliveries.
        if (
            kafka.publisher is not None
            and not kafka.access.refuses("Write")
            and self.unreachable_reason is None
        ):
            waited, limit = kafka.oldest_unacked_s, self.topology.limits.max_unacked_s
            if waited > limit:
                problems.append(
                    f"the oldest batch not acknowledged by the broker has waited {waited:.0f} s "
                    f"(limits.max_unacked_s={limit:g}): deliveries are stuck"
                )
        if self.ready:  # started and not stopping: every background thread must be running
            control_log = self.kafka.control_log
            if control_log is not None and not control_log.alive:
                problems.append(
                    f"the control-log thread stopped ({control_log.error!r}): "
                    "later control commands are not applied"
                )
            if self.learning is not None and (problem := self.learning.problem):
                problems.append(problem)
            transactions = kafka.transactions
            if transactions is not None and not transactions.alive and not transactions.problem:
                problems.append("the transaction thread stopped: no batch is committed any more")
        return problems

    def health_warnings(self) -> list[str]:
        """What is wrong but no restart mends: a missing ACL (a restart never grants one; the
        worker retries and reports the grant), topics no longer partitioned alike, a cluster
        unreachable past the grace (a restart brings no broker back)."""
        copartition = self.kafka.copartition_problem
        warnings = [copartition] if copartition else []
        if unreachable := self.unreachable_reason:
            warnings.append(
                f"{unreachable}: nothing is consumed or delivered until a broker answers; the "
                "clients keep reconnecting (a restart would not help)"
            )
        return warnings + self.kafka.access.problems()

    @property
    def unreachable_reason(self) -> str | None:
        """Why the cluster counts as unreachable (None: it is reachable, or has not been
        unreachable for longer than ``limits.unreachable_grace_s``)."""
        reach, grace = self.kafka.reachability, self.topology.limits.unreachable_grace_s
        outage = reach.outage()  # one read: how long and why, of the same outage
        if outage is None:
            return None
        down_s, why = outage
        if down_s <= grace:
            return None
        return f"Kafka unreachable for {down_s:.0f} s ({why}; limits.unreachable_grace_s={grace:g})"

    def health(self) -> tuple[int, dict[str, Any]]:
        """/healthz: 500 and the problems a restart mends; ``warnings`` (only when there are
        some) for what is wrong but would not be mended by a restart (the status stays 200:
        a liveness probe must not restart the pod in a loop over them)."""
        problems = self.health_problems()
        body: dict[str, Any] = {"ok": not problems, "problems": problems}
        if self.kafka.publisher is not None:  # how long the oldest unacknowledged batch waited
            body["oldest_unacked_s"] = round(self.kafka.oldest_unacked_s, 3)
        if warnings := self.health_warnings():
            body["warnings"] = warnings
        return (500 if problems else 200), body

    @property
    def not_ready_reason(self) -> str | None:
        """Why /readyz answers 503 (None: ready)."""
        if not self.ready:
            return "starting or stopping"
        return self.models.problem or self.unreachable_reason

    # --- start and stop ----------------------------------------------------------------

    async def start(
        self,
        put_batch: Callable[[SourceBatch], Coroutine[Any, Any, object]],
        put_command: Callable[[Message], Coroutine[Any, Any, object]],
    ) -> None:
        """Start serving: ``put_batch`` and ``put_command`` put a micro-batch and a control
        record on their agents' channels (on this event loop; the source's and the control
        log's threads reach them through :meth:`Threads.bridge`)."""
        # Before any version loads: a torch.export version is full of reference cycles, and a
        # frozen one would never be freed after a swap unloads it.
        freeze_heap()
        await self.threads.on_inference(self._prepare)
        topo = self.topology
        self.kafka.open(self.threads.bridge(put_batch), self._assigned)
        if self.learning is not None:
            self.learning.start()
        # A worker that cannot load the routing the log names consumes nothing (it does not
        # join the group: its peers serve every partition) until it can: never a routing the
        # log does not say. It follows the log, and retries the load, meanwhile.
        self._serve_once_loaded()
        assert self.kafka.control_log is not None  # _prepare made it
        self.kafka.control_log.follow(self.threads.bridge(put_command))
        self.ready = True
        self._retry_task = asyncio.create_task(self.control.retry_loads())
        if not self.models.serves:
            log.error("not consuming until the routing the control log names loads")
        log.info(
            "serving %s on %s: input %s, batches of <= %d within %g ms",
            ", ".join(f"{m}={dict(r.weights)}" for m, r in self.models.snapshot.routes.items()),
            self.models.device,
            topo.topics.input,
            topo.batching.max_batch_size,
            topo.batching.max_wait_ms,
        )

    def _prepare(self) -> None:
        """Blocking start-up work (inference thread): topics; the routing rebuilt from the
        control log; the versions it needs loaded and warmed up."""
        torch.set_num_threads(self.topology.worker.inference_threads)
        self.control.rebuild(self.kafka.prepare())

    def _serve_once_loaded(self) -> None:
        """Start consuming once a routing the log names is served (event loop)."""
        source = self.kafka.source
        if source is not None and self.models.serves and not self._source_started:
            self._source_started = True
            source.start()

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Stop serving within one deadline: the source drains its batches in flight and
        commits, the publisher delivers what is left, in the time that remains. Each step runs
        whether an earlier one failed or not (logged)."""
        self.ready = False
        if self._retry_task is not None:
            self._retry_task.cancel()
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout_s

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        steps: list[tuple[str, Callable[[], object]]] = []
        if (source := self.kafka.source) is not None:
            steps.append(("the batch source", lambda: source.stop(left())))
        if (transactions := self.kafka.transactions) is not None:
            # After the drain: what it handed out is committed (or aborted) by now.
            steps.append(("the transactions", lambda: transactions.close(max(1.0, left()))))
        if self.learning is not None:
            steps.append(("online learning", self.learning.stop))
        if (publisher := self.kafka.publisher) is not None:
            # At least a moment for what the drain just acknowledged, even past the deadline.
            steps.append(("the publisher", lambda: publisher.close(max(1.0, left()))))
        if self.kafka.control_log is not None:
            steps.append(("the control log", self.kafka.control_log.close))
        for name, step in steps:
            try:
                await loop.run_in_executor(None, step)
            except Exception:
                log.exception("stopping %s failed; stopping the rest", name)
        closes: list[tuple[str, Callable[[], object]]] = [
            (
                "the inference thread",
                functools.partial(self.threads.inference.shutdown, False, cancel_futures=True),
            ),
            ("the watchdog", self.models.watchdog.close),
            (
                "the model loader",
                functools.partial(self.threads.loader.shutdown, False, cancel_futures=True),
            ),
        ]
        for name, close in closes:
            try:
                close()
            except Exception:
                log.exception("stopping %s failed; stopping the rest", name)


def freeze_heap() -> None:
    """Collect, then move every object alive now (faust, torch, the topology, the clients) into
    the collector's permanent generation (``gc.freeze``), once, at start, before any model
    version loads (those are collected as usual: an unloaded version is freed).

    CPython's full (generation 2) collection walks every tracked object, and a loaded worker
    holds a few hundred thousand of them: one full collection stopped every thread for 80 to
    400 ms in the benchmark, every few seconds under load, which was the worker's tail at low
    load. Frozen objects are still freed when their reference count drops to zero; only a
    reference cycle among them is never collected, which start-up objects that live as long
    as the process do not form. Objects made later (versions, batches) are collected as
    before."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    log.info(
        "start-up heap frozen: %d objects left out of the collector's scans (%.0f ms)",
        gc.get_freeze_count(),
        (time.perf_counter() - started) * 1000,
    )
