"""The serving loop's state, on the event loop side (no faust imports here).

Per batch: the pipeline (decode, route, infer, encode) and the produce calls run in one
dedicated executor thread, never on the event loop. The batch then waits, in order, for the
broker to acknowledge all its records; only then is it marked delivered in the source's
checkpoint, which stores the offsets of the delivered prefix for commit. A batch that cannot
be served (an exception on the serving path, or a record no retry delivers and nothing else
can take) fails: the checkpoint latches, nothing after it is served, marked done or
committed, and the exception stops the worker, which restarts from the committed offsets.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from confluent_kafka import TIMESTAMP_LOG_APPEND_TIME, Message

from stream_infer.core import control
from stream_infer.core.control import (
    Command,
    RoutingTable,
    encode_ack,
    parse_command,
    required_versions,
)
from stream_infer.core.events import BatchResult, DeadLetter, ModelVersion, OutRecord
from stream_infer.core.pipeline import ModelOutput, Pipeline, Predictor, Serving
from stream_infer.core.serde import UNDELIVERABLE, FeatureDecoder, encode_dead_letter
from stream_infer.core.watchdog import Watchdog
from stream_infer.errors import ControlError, DeliveryError, ModelError
from stream_infer.inference.device import select_device
from stream_infer.inference.predictor import TorchPredictor
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
from stream_infer.io.source import BatchSource, SourceBatch
from stream_infer.observability import Metrics
from stream_infer.online.learner import OnlineLearner
from stream_infer.runtime.learning import LearningService
from stream_infer.settings import LearnerSettings, Topology

log = logging.getLogger(__name__)


class InferenceRuntime:
    def __init__(self, topology: Topology, metrics: Metrics | None = None) -> None:
        self.topology = topology
        self.metrics = metrics or Metrics()
        self.device = select_device(topology.device)
        self.watchdog = Watchdog(
            topology.limits.inference_timeout_s,
            max_hung=topology.limits.max_hung_calls,
            on_hung=self._on_hung,
        )
        self.pipeline = Pipeline(
            FeatureDecoder(topology.features, topology.limits.max_event_bytes),
            [ModelOutput(m.name, topology.prediction_topic(m)) for m in topology.models],
            dead_letter_topic=topology.topics.dead_letter,
            shadow_topic=topology.topics.shadow,
            track_scores=topology.online.enabled,
            watchdog=self.watchdog,
            max_dead_letter_bytes=topology.limits.max_dead_letter_bytes,
        )
        self.serving = Serving(routes={}, predictors={})
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        # Models load here, beside serving, never on the inference thread.
        self.loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader")
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}"
        declared = {m.name: topology.versions_of(m.name) for m in topology.models}
        serving = {m.name: m.serving for m in topology.models}
        learners = {ModelVersion(x.model, x.version) for x in topology.online.learners}
        self.table = RoutingTable.initial(declared, serving, time.time(), learners=learners)
        # Why this worker cannot serve the routing the control log names (None: it serves it).
        self.load_problem: str | None = None
        self._load_out_of_memory = False  # the last load failed for lack of memory
        self._max_message_bytes: dict[str, int] = {}  # output topics' max.message.bytes
        self.load_retry_s = 10.0
        self._source_started = False
        self._retry_task: asyncio.Task[None] | None = None
        self._predictors: dict[tuple[str, str], Predictor] = {}
        key = topology.control.hmac_key
        self._hmac_key = key.get_secret_value().encode() if key else None
        self.control_log: ControlLog | None = None
        self.learning: LearningService | None = None
        if topology.online.enabled:
            self.learning = LearningService(
                topology,
                self.metrics,
                publish=self._publish_untracked,
                predictors=lambda: self._predictors,
                # The table's routes and generation, not what serves here (which may lag a
                # load): a policy command is judged against the table, on every worker.
                routes=lambda: self.table.routes,
                generation=lambda: self.table.generation,
                worker=topology.worker.id or socket.gethostname(),
            )
        self._labels_topic = topology.topics.labels if topology.online.enabled else None
        # Set when the input and labels topics stop being partitioned alike (a partition added
        # to one of them while the worker runs): the label join breaks, serving does not.
        self.copartition_problem: str | None = None
        # Topics and groups Kafka refuses this worker (missing ACLs): health problems.
        self.access = AccessRefusals()
        self.metrics.access_refused.set_function(lambda: len(self.access))
        self.publisher: Publisher | None = None
        self.source: BatchSource | None = None
        self.ready = False
        self.started = asyncio.Event()
        self._commits: asyncio.Queue[tuple[SourceBatch, Ticket]] | None = None
        self.totals = {"events": 0, "predictions": 0, "dead_letters": 0, "batches": 0}

    def _on_hung(self, key: tuple[str, str], hung: int, timed_out: bool) -> None:
        self.metrics.hung_calls.labels(*key).set(hung)
        if timed_out:
            self.metrics.inference_timeouts.labels(*key).inc()

    def health_problems(self) -> list[str]:
        """Why this worker should be restarted (empty when it is healthy)."""
        problems = []
        if self.load_problem is not None and self._load_out_of_memory:
            problems.append(
                f"out of memory loading what the control log routes ({self.load_problem}) "
                "while earlier versions are resident: a restart loads only what the log names"
            )
        if self.source is not None and self.source.error is not None:
            problems.append(f"the batch source failed: {self.source.error!r}")
        if self.source is not None and self.source.group_problem is not None:
            problems.append(self.source.group_problem)
        for model, version in self.watchdog.saturated():
            problems.append(
                f"{model}:{version} has {self.topology.limits.max_hung_calls} hung model calls; "
                "only a restart reclaims their threads"
            )
        if self.source is not None and self.source.failure is not None:
            problems.append(
                f"a batch failed ({self.source.failure}): nothing after it is committed; a "
                "restart serves it again"
            )
        if self.publisher is not None and (problem := self.publisher.problem):
            problems.append(problem)
        # A refused Write holds deliveries back: that is a warning, not a stall. A refused
        # Read (the control log, an idle labels topic) says nothing of deliveries.
        if self.publisher is not None and not self.access.refuses("Write"):
            waited, limit = self.publisher.oldest_unacked_s, self.topology.limits.max_unacked_s
            if waited > limit:
                problems.append(
                    f"the oldest batch not acknowledged by the broker has waited {waited:.0f} s "
                    f"(limits.max_unacked_s={limit:g}): deliveries are stuck"
                )
        if self.ready:  # started and not stopping: every background thread must be running
            if self.control_log is not None and not self.control_log.alive:
                problems.append(
                    f"the control-log thread stopped ({self.control_log.error!r}): "
                    "later control commands are not applied"
                )
            if self.learning is not None and (problem := self.learning.problem):
                problems.append(problem)
        return problems

    def health_warnings(self) -> list[str]:
        """What is wrong but no restart mends: a missing ACL (a restart never grants one; the
        worker retries and reports the grant), topics no longer partitioned alike."""
        warnings = [self.copartition_problem] if self.copartition_problem else []
        return warnings + self.access.problems()

    def health(self) -> tuple[int, dict[str, Any]]:
        """/healthz: 500 and the problems a restart mends; ``warnings`` (only when there are
        some) for what is wrong but would not be mended by a restart (the status stays 200:
        a liveness probe must not restart the pod in a loop over them)."""
        problems = self.health_problems()
        body: dict[str, Any] = {"ok": not problems, "problems": problems}
        if self.publisher is not None:  # how long the oldest unacknowledged batch has waited
            body["oldest_unacked_s"] = round(self.publisher.oldest_unacked_s, 3)
        if warnings := self.health_warnings():
            body["warnings"] = warnings
        return (500 if problems else 200), body

    def _assigned(self, parts: list[tuple[str, int]]) -> None:
        """The consumer thread's assignment changed (after a revocation or an assignment)."""
        owned = [p for topic, p in parts if topic == self.topology.topics.input]
        self.metrics.assigned_partitions.set(len(owned))
        if self.learning is not None:
            self.learning.assigned(owned)

    def _partitions_changed(self, counts: dict[str, int]) -> None:
        """The consumer thread saw new partition counts: is the label join still possible?"""
        if self._labels_topic is None:
            return
        problem = copartition_problem(counts, self.topology.topics.input, self._labels_topic)
        if problem and problem != self.copartition_problem:
            log.error("labels cannot be joined any more: %s", problem)
        elif self.copartition_problem and not problem:
            log.warning("the input and labels topics are partitioned alike again")
        self.copartition_problem = problem

    # --- start and stop ----------------------------------------------------------------

    async def start(
        self,
        hand_off: Callable[[SourceBatch], None],
        control_hand_off: Callable[[Message], None],
    ) -> None:
        loop = asyncio.get_running_loop()
        self._commits = asyncio.Queue()
        await loop.run_in_executor(self.executor, self._prepare)
        topo = self.topology
        conf = producer_config(topo.kafka)
        if batch_bytes := producer_batch_bytes(conf, self._max_message_bytes):
            # A batch over a topic's max.message.bytes is refused whole, every record in it.
            log.info(
                "producer batch.size %d: under the output topics' max.message.bytes", batch_bytes
            )
            conf["batch.size"] = batch_bytes
        self.publisher = Publisher(
            conf,
            on_retry=lambda topic, err: self.metrics.delivery_retries.labels(topic, err).inc(),
            undeliverable=self._undeliverable,
            access=self.access,
            max_message_bytes=self._max_message_bytes,
        )
        # Labels come through the same group as the events: with the same partition count and
        # the same keys, partition i of both lands on the same worker (co-partitioned join).
        inputs = [topo.topics.input] + ([self._labels_topic] if self._labels_topic else [])
        self.source = BatchSource(
            consumer_config(topo.kafka, topo.group_id),
            inputs,
            max_batch_size=topo.batching.max_batch_size,
            max_wait_ms=topo.batching.max_wait_ms,
            max_in_flight=topo.batching.max_batches_in_flight,
            hand_off=hand_off,
            on_assignment=self._assigned,
            on_backpressure=self.metrics.source_backpressure_seconds.inc,
            on_partition_counts=self._partitions_changed,
            on_fetch_delay=self.metrics.fetch_delay_seconds.observe,
            access=self.access,
        )
        # Read at scrape time: the batches handed over and not yet done, as they are now.
        source = self.source
        self.metrics.in_flight.set_function(lambda: source.in_flight)
        if self.learning is not None:
            self.learning.start()
        # A worker that cannot load the routing the log names consumes nothing (it does not
        # join the group: its peers serve every partition) until it can: never a routing the
        # log does not say. It follows the log, and retries the load, meanwhile.
        self._serve_once_loaded()
        assert self.control_log is not None  # _prepare made it
        self.control_log.follow(control_hand_off)
        self.ready = True
        self.metrics.ready.set(1 if self.load_problem is None else 0)
        self._retry_task = asyncio.create_task(self._retry_loads())
        if not self.serves:
            log.error("not consuming until the routing the control log names loads")
        log.info(
            "serving %s on %s: input %s, batches of <= %d within %g ms",
            ", ".join(f"{m}={dict(r.weights)}" for m, r in self.serving.routes.items()),
            self.device,
            topo.topics.input,
            topo.batching.max_batch_size,
            topo.batching.max_wait_ms,
        )

    def _serve_once_loaded(self) -> None:
        """Start consuming once a routing the log names is served (event loop)."""
        if self.source is not None and self.serves and not self._source_started:
            self._source_started = True
            self.source.start()

    async def _retry_loads(self) -> None:
        """Forever: every ``load_retry_s``, while the log's routing is not served, load it
        again (on the loader thread, in order with the commands)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.load_retry_s)
            if self.load_problem is not None:
                await loop.run_in_executor(self.loader, self._load_table)
                self._serve_once_loaded()

    def _prepare(self) -> None:
        """Blocking start-up work (executor thread): topics; the routing rebuilt from the
        control log; the versions it needs loaded and warmed up."""
        topo = self.topology
        torch.set_num_threads(topo.worker.inference_threads)
        ensure_topology_topics(topo)
        self._max_message_bytes = output_max_message_bytes(topo)
        self.control_log = ControlLog(
            consumer_config(topo.kafka, "unused"), topo.topics.control, access=self.access
        )
        self._rebuild(self.control_log.replay())

    def _rebuild(self, replayed: Sequence[Message]) -> None:
        """The routing table planned over the whole log, then only what it ends with loaded.

        Never raises because of one command: a command is applied or rejected by the table
        (which depends on the log alone), and a routing that does not load leaves this worker
        serving nothing, not ready, until it does (:meth:`_load_table`, retried).
        """
        # Online learners are always loaded (they learn whether they serve or not), before the
        # replay: the resets it goes through apply to them.
        self._load_required(self._learner_keys)
        for msg in replayed:
            self._apply(msg.value(), replay=True, offset=msg.offset(), record_ts=record_time_s(msg))
        problem = self._load_table()
        log.info(
            "routing rebuilt from %d control commands: %s%s",
            len(replayed),
            self.table.as_dict()["routes"],
            f"; NOT serving it: {problem}" if problem else "",
        )

    # --- control ----------------------------------------------------------------------------

    @property
    def _learner_keys(self) -> set[tuple[str, str]]:
        return {(x.model, x.version) for x in self.topology.online.learners}

    @property
    def serves(self) -> bool:
        """Whether this worker serves a routing (at start: once the log's routing loaded)."""
        return bool(self.serving.routes)

    @property
    def not_ready_reason(self) -> str | None:
        """Why /readyz answers 503 (None: ready)."""
        if not self.ready:
            return "starting or stopping"
        return self.load_problem

    def _load_table(self) -> str | None:
        """Load what the routing table routes and serve it; else say why (loader thread).

        Any failure to load, move or warm up a version (a missing or corrupt artifact, a torch
        error, out of device memory, an assertion in the model's warm-up) is caught here: the
        worker keeps serving what it served, is not ready, and the reason is returned.
        """
        needed = required_versions(self.table.routes) | self._learner_keys
        try:
            self._load_required(needed)
        except Exception as exc:  # the loading boundary: nothing of a load escapes it
            problem = str(exc) if isinstance(exc, ModelError) else f"{type(exc).__name__}: {exc}"
            # Retrying beside the versions that serve now may never fit; a restart would.
            self._load_out_of_memory = _out_of_memory(exc) and len(self._predictors) > len(
                self._learner_keys
            )
            if problem != self.load_problem:
                log.error("cannot serve the routing the control log names: %s", problem)
            self.load_problem = problem
            self.metrics.ready.set(0)
            return problem
        if self.load_problem is not None:
            log.warning("the routing the control log names loaded: %s", self.table.routes)
        self.load_problem = None
        self._load_out_of_memory = False
        self._install()
        if self.ready:
            self.metrics.ready.set(1)
        return None

    def _load_required(self, needed: set[tuple[str, str]]) -> None:
        """Load and warm up every needed version not loaded yet. Raises ModelError, with the
        version and the reason, whatever went wrong."""
        for model, version in sorted(needed - set(self._predictors)):
            try:
                self._load_one(model, version)
            except Exception as exc:
                msg = (
                    f"{model}:{version} could not be loaded, moved to {self.device} or warmed "
                    f"up: {type(exc).__name__}: {exc}"
                )
                raise ModelError(msg) from exc

    def _load_one(self, model: str, version: str) -> None:
        learner = next(
            (x for x in self.topology.online.learners if (x.model, x.version) == (model, version)),
            None,
        )
        if learner is not None:
            self._predictors[(model, version)] = self._make_learner(learner)
            return
        settings = self.topology.model(model)
        spec = settings.version(version) if settings else None
        if spec is None:  # the routing table only names declared versions
            raise ModelError(f"{model}:{version} is not declared")
        started = time.perf_counter()
        _meta, predictor = TorchPredictor.load(
            spec.path,
            model=model,
            version=version,
            features=self.topology.features,
            device=self.device,
        )
        predictor.warm_up()
        self._predictors[(model, version)] = predictor
        log.info("loaded %s:%s in %.0f ms", model, version, (time.perf_counter() - started) * 1000)

    def _make_learner(self, spec: LearnerSettings) -> OnlineLearner:
        """A River learner; restored from a snapshot that fits the topology when there is one
        (a bad one is refused with an ERROR line and a count: the learner starts afresh)."""
        assert self.learning is not None  # declared learners turn online learning on
        return self.learning.learner_for(spec)

    def _install(self) -> None:
        """Make the routing table's routes the serving snapshot (atomic for the next batch)."""
        routes = dict(self.table.routes)
        needed = required_versions(routes)
        before = self.serving.routes
        changed = {m for m, r in routes.items() if before and before.get(m) != r}
        self.serving = Serving(
            routes=routes,
            predictors={key: self._predictors[key] for key in needed},
            changed_at=self.table.changed_at,
        )
        # Unload what neither this routing nor a learner needs (a batch still on the inference
        # thread keeps its own references until it is done).
        keep = needed | self._learner_keys
        for key in set(self._predictors) - keep:
            del self._predictors[key]
            log.info("unloaded %s:%s", *key)
        self.metrics.set_routes({m: dict(r.weights) for m, r in routes.items()})
        self.metrics.routing_changed.set(self.table.changed_at)
        if changed and self.learning is not None:
            self.learning.serving_changed(changed)

    def _apply(
        self,
        raw: bytes | None,
        *,
        replay: bool = False,
        offset: int | None = None,
        record_ts: float | None = None,
    ) -> tuple[Command | None, ControlError | None]:
        """Parse, validate and apply to the routing table, then (live) load what it routes and
        switch. Runs on the loader thread.

        Applied or rejected is decided by the table, from the log alone (``record_ts``: the
        record's Kafka timestamp, for ``issued_at``): the same on every worker. A rejected
        command leaves the routing untouched. A routing that does not load is not a rejection:
        ``load_problem`` says why, and the last routing that loaded keeps serving. During the
        replay nothing is loaded; :meth:`_rebuild` loads what the whole log ends with.
        """
        cmd: Command | None = None
        try:
            cmd = parse_command(
                raw,
                hmac_key=self._hmac_key,
                max_age_s=self.topology.control.max_command_age_s,
                record_ts=record_ts,
            )
            changed = self.table.apply(cmd, time.time())
            if cmd.command == "reset_learner":  # the table checked that it names a learner
                self._reset_learner(cmd, offset)
            elif not replay and (changed or self.load_problem is not None):
                self._load_table()
        except ControlError as exc:
            self.metrics.control_commands.labels(cmd.command if cmd else "?", "rejected").inc()
            log.warning(
                "control command %s rejected%s: %s",
                exc.command_id,
                " (replay)" if replay else "",
                exc,
            )
            return cmd, exc
        self.metrics.control_commands.labels(cmd.command, "applied").inc()
        log.info(
            "control command %s (%s) applied%s: %s",
            cmd.id,
            cmd.command,
            " (replay)" if replay else "",
            self.table.as_dict()["routes"],
        )
        return cmd, None

    def _reset_learner(self, cmd: Command, offset: int | None = None) -> None:
        """Reset a learner, unless its state already follows this command: a learner restored
        from a snapshot records the control-log offset of the last reset it went through, and
        the replay at start skips the resets at or below it (so a restart restores exactly
        what was learned). ``offset``: the command's control-log offset (None: not known)."""
        learner = self._predictors.get((cmd.model or "", cmd.version or ""))
        if not isinstance(learner, OnlineLearner):
            msg = f"{cmd.model}:{cmd.version} is not an online learner"
            raise ControlError(control.NOT_A_LEARNER, msg, command_id=cmd.id)
        if offset is not None and offset <= learner.control_offset:
            log.info(
                "reset of %s:%s at control offset %d skipped: its snapshot already follows "
                "the reset at offset %d",
                cmd.model,
                cmd.version,
                offset,
                learner.control_offset,
            )
            return
        learner.reset(offset)
        if self.learning is not None:  # its error starts afresh: so do the model's monitors
            self.learning.serving_changed({learner.model})

    async def handle_control(
        self, raw: bytes | None, offset: int | None = None, timestamp_s: float | None = None
    ) -> None:
        """Apply one live command (``offset``: its control-log offset, ``timestamp_s``: its
        record's timestamp) off the serving path, then acknowledge it on the acks topic."""
        loop = asyncio.get_running_loop()
        apply = functools.partial(self._apply, raw, offset=offset, record_ts=timestamp_s)
        cmd, error = await loop.run_in_executor(self.loader, apply)
        self._serve_once_loaded()
        if error is None:
            # A batch that read the old snapshot may still be on the inference thread. That
            # thread runs batches in order, so once a no-op has run there, every batch served
            # by the old routing is done: what the ack promises is then true of everything after.
            await loop.run_in_executor(self.executor, _barrier)
        acks = self.topology.topics.acks
        if acks is None or self.publisher is None:
            return
        value = encode_ack(
            command_id=cmd.id if cmd else getattr(error, "command_id", None),
            command=cmd.command if cmd else None,
            worker=self.worker_id,
            table=self.table,
            error=error,
            now=time.time(),
            not_loaded=self.load_problem if error is None else None,
            serving=self.serving.routes,
        )
        # Not awaited: an ack gates no offset (the control log is replayed, not committed), and
        # waiting on it would hold every later command (a rollback) while the acks topic
        # refuses Write. It is still delivered with retries, in order. Published on the loader
        # thread (one thread: acks keep their order), not on the event loop.
        ack = [OutRecord(acks, self.worker_id.encode(), value)]
        try:
            loop.run_in_executor(self.loader, self._publish_untracked, ack)
        except RuntimeError:  # the loader is shut down: the worker is stopping
            log.warning("ack of %s not sent: the worker is stopping", cmd.id if cmd else None)

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Stop serving within one deadline: the source drains its batches in flight and
        commits, the publisher delivers what is left, in the time that remains. Each step runs
        whether an earlier one failed or not (logged)."""
        self.ready = False
        self.metrics.ready.set(0)
        if self._retry_task is not None:
            self._retry_task.cancel()
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout_s

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        steps: list[tuple[str, Callable[[], object]]] = []
        if self.source is not None:
            source = self.source
            steps.append(("the batch source", lambda: source.stop(left())))
        if self.learning is not None:
            steps.append(("online learning", self.learning.stop))
        if self.publisher is not None:
            publisher = self.publisher
            # At least a moment for what the drain just acknowledged, even past the deadline.
            steps.append(("the publisher", lambda: publisher.close(max(1.0, left()))))
        if self.control_log is not None:
            steps.append(("the control log", self.control_log.close))
        for name, step in steps:
            try:
                await loop.run_in_executor(None, step)
            except Exception:
                log.exception("stopping %s failed; stopping the rest", name)
        closes: list[tuple[str, Callable[[], object]]] = [
            (
                "the inference thread",
                functools.partial(self.executor.shutdown, False, cancel_futures=True),
            ),
            ("the watchdog", self.watchdog.close),
            (
                "the model loader",
                functools.partial(self.loader.shutdown, False, cancel_futures=True),
            ),
        ]
        for name, close in closes:
            try:
                close()
            except Exception:
                log.exception("stopping %s failed; stopping the rest", name)

    # --- per batch -----------------------------------------------------------------------

    async def handle(self, batch: SourceBatch) -> None:
        """Process and publish one batch, then queue it for in-order commit.

        Once a batch failed, later batches (taken by an agent restarted during shutdown) are
        skipped: not served, never marked done. A batch that raises fails in the checkpoint
        before the exception goes on (to stop the worker)."""
        assert self._commits is not None and self.source is not None
        if self.source.failure is not None:
            log.debug("batch %d skipped: an earlier batch failed", batch.seq)
            return
        loop = asyncio.get_running_loop()
        if batch.opened_at is not None:
            self.metrics.batching_seconds.observe(batch.closed_at - batch.opened_at)
        self.metrics.queue_wait_seconds.observe(time.monotonic() - batch.closed_at)
        ticket = Ticket(loop)
        started = time.perf_counter()
        try:
            result = await loop.run_in_executor(self.executor, self._process, batch, ticket)
            self.metrics.observe_batch(result, time.perf_counter() - started)
            self.metrics.observe_latency(result.event_ts, time.time())
            self._count(result)
        except Exception as exc:  # not a cancellation: an unserved batch is never done anyway
            self.source.fail(batch, f"cannot serve it: {exc!r}")
            raise
        await self._commits.put((batch, ticket))

    def _process(self, batch: SourceBatch, ticket: Ticket) -> BatchResult:
        assert self.publisher is not None
        records, labels = batch.records, []
        if self._labels_topic is not None:
            labels = [r for r in records if r.topic() == self._labels_topic]
            if labels:
                records = [r for r in records if r.topic() != self._labels_topic]
        result = self.pipeline.process(records, self.serving)
        decoded: list[tuple[str, float]] = []
        if labels and self.learning is not None:
            # Invalid labels are dead letters of this batch: its offsets wait for them.
            decoded, invalid = self.learning.split_labels(labels)
            result.dead_letters.extend(invalid)
            result.records.extend(self.pipeline.dead_letter_records(invalid))
        self.publisher.publish(result.records, ticket)
        if self.learning is not None:
            batch_rows = result.batch
            # Each scored event's input partition: the join tells a label lost to a rebalance.
            partitions = (
                [records[i].partition() or 0 for i in batch_rows.positions] if batch_rows else None
            )
            self.learning.submit(batch_rows, result.scored, decoded, partitions)
        return result

    def _publish_untracked(self, records: list[OutRecord]) -> None:
        """Drift events, policy commands, label dead letters: delivered with retries, but no
        input offset waits on them."""
        if self.publisher is not None and records:
            self.publisher.publish(records, Ticket(None))

    def _count(self, result: BatchResult) -> None:
        self.totals["events"] += result.n_in
        self.totals["predictions"] += sum(result.served.values())
        self.totals["dead_letters"] += len(result.dead_letters)
        self.totals["batches"] += 1

    async def commit_in_order(self) -> None:
        """Forever: wait for each batch's delivery, in order, then mark it done (the source
        stores its offsets). Raises :class:`DeliveryError` once a batch's record can never
        be delivered: the batch failed, nothing after it is committed."""
        assert self._commits is not None and self.source is not None
        while True:
            batch, ticket = await self._commits.get()
            try:
                await ticket.delivered()
            except DeliveryError as exc:
                self.source.fail(batch, f"a record cannot be delivered: {exc}")
                raise
            self.metrics.delivery_seconds.observe(time.monotonic() - ticket.sent_at)
            self.source.done(batch)

    def _undeliverable(self, record: OutRecord, why: str) -> OutRecord | None:
        """A record its topic refuses for good becomes a dead letter (``undeliverable``) that
        keeps it, under its key; None for a dead letter (nothing else could take it). Runs on
        the publisher's threads."""
        dead_letter_topic = self.topology.topics.dead_letter
        if record.topic == dead_letter_topic:
            return None
        letter = DeadLetter(UNDELIVERABLE, why, _Produced(record))
        value = encode_dead_letter(letter, max_bytes=self.topology.limits.max_dead_letter_bytes)
        self.metrics.dead_letters.labels(UNDELIVERABLE).inc()
        return OutRecord(dead_letter_topic, record.key, value)


class _Produced:
    """A record this worker produced, seen as a dead letter's record: where its input record
    was read from (a prediction's event), or, for a record made from no input record (a drift
    event, an ack), ``topic`` is where it was going."""

    __slots__ = ("_record",)

    def __init__(self, record: OutRecord) -> None:
        self._record = record

    def value(self) -> bytes | None:
        return self._record.value

    def key(self) -> bytes | None:
        return self._record.key

    def topic(self) -> str | None:
        source = self._record.source
        return source.topic() if source is not None else self._record.topic

    def partition(self) -> int | None:
        source = self._record.source
        return source.partition() if source is not None else None

    def offset(self) -> int | None:
        source = self._record.source
        return source.offset() if source is not None else None


def _barrier() -> None:
    """Runs on the inference thread after every batch queued before it."""


def _out_of_memory(exc: BaseException) -> bool:
    """Whether a load failed for lack of (device or host) memory, anywhere in its causes."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, MemoryError | torch.OutOfMemoryError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def record_time_s(msg: Message) -> float | None:
    """When the broker wrote the record, in seconds: None unless its timestamp is the broker's
    (LogAppendTime; with CreateTime the sender chooses it, so it proves nothing)."""
    kind, ms = msg.timestamp()
    return ms / 1000.0 if kind == TIMESTAMP_LOG_APPEND_TIME else None
