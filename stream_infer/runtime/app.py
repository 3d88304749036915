"""The faust app: agents over a channel of micro-batches, the commit task, timers, web pages.

faust's own Kafka consumer and producer are switched off (``enable_kafka=False``): records
move through librdkafka in io/, and the ``serve`` agent receives one item per micro-batch, so
faust's per-event cost is paid once per batch. faust still runs the agents, their supervision,
timers, the web server (metrics, health, readiness) and the worker's lifecycle and signals.

This is the only module that imports faust. The work is the runtime's
(:class:`~stream_infer.runtime.worker.InferenceRuntime`); how it crosses threads is drawn in
:mod:`stream_infer.runtime.threads`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, cast

import faust
from faust.app.base import BootStrategy

from stream_infer.io.clients import RDKAFKA_LOG
from stream_infer.runtime.control_plane import record_time_s
from stream_infer.runtime.worker import InferenceRuntime
from stream_infer.settings import Topology

log = logging.getLogger(__name__)


class _NoFaustKafka(BootStrategy):
    """Start agents, timers, sensors and web, but not faust's aiokafka consumer/producer."""

    enable_kafka = False


def _datadir(topology: Topology) -> Path:
    """faust's data folder, under worker.state_dir (faust makes only its last level)."""
    path = topology.worker.state_dir / f"stream-infer-{topology.name}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def create_app(topology: Topology, runtime: InferenceRuntime | None = None) -> faust.App:
    """Build the faust app of one worker. Nothing connects until the worker starts it."""
    rt = runtime or InferenceRuntime(topology)
    app = faust.App(
        f"stream-infer-{topology.name}",
        broker=f"kafka://{topology.kafka.bootstrap_servers.split(',')[0]}",
        web_enabled=True,
        web_port=topology.worker.web_port,
        web_bind=topology.worker.web_host,
        web_host=topology.worker.web_host,
        autodiscover=False,
        store="memory://",
        datadir=str(_datadir(topology)),
        topic_disable_leader=True,
        stream_buffer_maxsize=max(64, topology.batching.max_batches_in_flight * 4),
    )
    app.boot_strategy = _NoFaustKafka(app)
    batches = app.channel()
    commands = app.channel()

    @app.agent(batches, concurrency=1)
    async def serve(stream: Any) -> None:
        async for batch in stream:
            try:
                await rt.batches.handle(batch)
            except Exception as exc:
                # handle failed the batch in the source's checkpoint: nothing after it is
                # served, marked done or committed, even by this agent restarted by faust's
                # supervisor during the shutdown. Stop the worker; it restarts from the
                # committed offsets and serves the batch again.
                log.critical("cannot handle a batch; stopping the worker", exc_info=True)
                await app.crash(exc)
                raise

    @app.agent(commands, concurrency=1)
    async def obey(stream: Any) -> None:
        """Control commands, one at a time, in log order; each is answered on the acks topic."""
        async for msg in stream:
            await rt.control.handle(msg.value(), msg.offset(), record_time_s(msg))

    @app.task  # type: ignore[untyped-decorator]
    async def commit_in_order() -> None:
        await rt.started.wait()
        await _commit_or_crash(app, rt)

    @app.task  # type: ignore[untyped-decorator]
    async def start_serving() -> None:
        # faust resumes flow control when its own consumer gets partitions; it has none here.
        app.flow_control.resume()
        try:
            # One item per micro-batch: the channels carry plain objects, not faust events.
            await rt.start(
                lambda batch: batches.put(cast(Any, batch)),
                lambda msg: commands.put(cast(Any, msg)),
            )
        except Exception as exc:
            log.critical("cannot start serving: %s", exc)
            await app.crash(exc)
            raise
        rt.started.set()

    last = {"t": time.monotonic(), "events": 0}

    @app.timer(interval=5.0)  # type: ignore[untyped-decorator]
    async def report() -> None:
        RDKAFKA_LOG.flush_due()  # librdkafka lines suppressed, of kinds that stopped: counted
        rt.kafka.reachability.flush_due()  # outages and client errors suppressed: counted
        if rt.kafka.control_log is not None:
            rt.kafka.control_log.flush_due()
        now = time.monotonic()
        totals = rt.batches.inference.totals
        events = totals["events"]
        rate = (events - last["events"]) / max(1e-9, now - last["t"])
        last.update(t=now, events=events)
        log.info(
            "events %d (%.0f/s), predictions %d, dead letters %d, batches %d, in flight %d",
            events,
            rate,
            totals["predictions"],
            totals["dead_letters"],
            totals["batches"],
            rt.kafka.source.in_flight if rt.kafka.source else 0,
        )

    @app.page("/metrics")
    async def metrics(web: Any, request: Any) -> Any:
        if rt.kafka.source is not None:  # the lag as last measured (every lag_interval_s)
            rt.metrics.set_consumer_lag(rt.kafka.source.lag, topology.topics.input)
        return web.bytes(rt.metrics.exposition(), content_type="text/plain; version=0.0.4")

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        status, body = rt.health()
        return web.json(body, status=status)

    @app.page("/readyz")
    async def readyz(web: Any, request: Any) -> Any:
        # Not ready while starting, stopping, the routing the control log names not loaded, or
        # Kafka unreachable for longer than limits.unreachable_grace_s.
        return web.json(
            {"ready": rt.not_ready_reason is None, "reason": rt.not_ready_reason},
            status=503 if rt.not_ready_reason else 200,
        )

    async def _stop_serving(_app: faust.App, **_: Any) -> None:
        await rt.stop()

    app.on_before_shutdown.connect(_stop_serving)  # type: ignore[arg-type]
    return app


async def _commit_or_crash(app: faust.App, rt: InferenceRuntime) -> None:
    """Commit batches after delivery, in order, forever; a batch with a record that can never be
    delivered failed (nothing after it is committed): stop the worker, as for a batch that
    cannot be handled."""
    try:
        await rt.batches.commits.run()
    except Exception as exc:
        log.critical("a batch cannot be delivered; stopping the worker", exc_info=True)
        await app.crash(exc)
        raise


def run_worker(topology: Topology, loglevel: str = "info") -> int:
    """Run one worker in the foreground until SIGINT/SIGTERM. Returns the exit code."""
    app = create_app(topology)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
