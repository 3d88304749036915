"""One system under test at a time: its topics, processes, reader and sampler, and the phases.

Saturation: the input topic is pre-filled with N events, then the system starts; throughput is
N over the time from the first to the last prediction the reader saw (start-up and the group
join are outside that window). CPU is the process trees' user+sys over the same window.

Latency: the system starts on fresh, empty topics and answers a few probe events; then an
open-loop producer offers a fixed rate for a fixed time (events are due at ``start + i / rate``
whatever the system does, so queueing shows up as latency); after the producer stops the reader
waits for every prediction. Percentiles are over events generated after the warm-up. For
stream-infer, the worker's /metrics are scraped when the warm-up ends and again at the end, and
each latency stage's p50/p99 is read from the difference (bench/stages.py); under exactly_once
the transaction's stages (begin, produce, send_offsets, commit, abort) and the transactions by
outcome too. A saturation run is scraped once, at its end (everything since the start).

Every phase gets a fresh run (topics, group, process): tansu's in-memory storage was seen to
get slower as a partition grows (the same rate on a topic that already held ~75,000 records
had several times the p99 of a fresh one), so no phase may inherit another's records.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient

from bench import stages
from bench.events import EventPool, events_for
from bench.plan import Plan
from bench.procs import Started, Supervisor, TreeSampler, clean_env
from bench.reader import RDKAFKA_LOG, PhaseStats, PredictionReader
from bench.systems import BASE_TOPOLOGY, SystemSpec, new_run_id, write_topology
from stream_infer.io.clients import ensure_topics, ensure_topology_topics
from stream_infer.local.loadgen import OpenLoopProducer
from stream_infer.local.tansu import free_port
from stream_infer.settings import KafkaSettings, Topology, load_topology

SATURATION_SEED = 0
PROBE_SEED = 999
log = logging.getLogger(__name__)


class SystemFailed(RuntimeError):
    """A system under test exited or stopped producing predictions."""


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class BenchContext:
    """What every run shares: the broker, the supervisor, the plan and the events."""

    bootstrap_servers: str
    broker_pid: int | None
    supervisor: Supervisor
    plan: Plan
    work_dir: Path
    results_dir: Path | None = None  # where results.json goes (the profile's flame graph too)
    pool: EventPool = field(default_factory=lambda: EventPool(load_topology(BASE_TOPOLOGY, env={})))


class SystemRun:
    """A system under test with fresh topics and group; stops everything on exit."""

    def __init__(self, ctx: BenchContext, spec: SystemSpec) -> None:
        self.ctx = ctx
        self.spec = spec
        self.run_id = new_run_id(spec.key)
        self.path, self.topo = write_topology(
            ctx.work_dir / "topologies",
            run_id=self.run_id,
            bootstrap_servers=ctx.bootstrap_servers,
            session_timeout_ms=ctx.plan.session_timeout_ms,
            batching=spec.batching,
            guarantee=spec.guarantee,
            workload=spec.workload,
        )
        # The workload's events (bench/workloads.py): the shared pool when its features are
        # the shipped topology's, else one made for its features.
        self.pool = events_for(ctx.pool, self.topo, spec.workload.event_padding)
        self.procs: list[Started] = []
        self.sampler: TreeSampler | None = None
        self.reader = PredictionReader(
            ctx.bootstrap_servers, [self.topo.prediction_topic(m) for m in self.topo.models]
        )
        self.started_at = 0.0
        self.stop_s = 0.0

    # --- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> SystemRun:
        # Explicitly, with the topology's partition counts, before anything touches them.
        ensure_topology_topics(self.topo)
        self.reader.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Each step runs even if a second Ctrl-C interrupts the one before.
        t0 = time.monotonic()
        try:
            self.ctx.supervisor.stop_many(self.procs, self.ctx.plan.stop_grace_s)
            self.stop_s = time.monotonic() - t0
        finally:
            try:
                if self.sampler is not None:
                    self.sampler.stop()
            finally:
                try:
                    self.reader.stop()
                finally:
                    delete_topics(self.ctx.bootstrap_servers, self.topo.all_topics())

    def start(self) -> None:
        for i, cmd in enumerate(self.spec.commands(self.path)):
            name = f"{self.run_id}-{i}" if self.spec.workers > 1 else self.run_id
            # Workers of one topology share everything but their web port.
            extra = {"STREAM_INFER_WORKER__WEB_PORT": str(free_port())} if i else {}
            self.procs.append(self.ctx.supervisor.start(name, cmd, clean_env(extra)))
        self.started_at = time.time()
        self.sampler = TreeSampler(
            [p.proc.pid for p in self.procs],
            self.ctx.broker_pid,
            self.ctx.plan.sample_interval_s,
        ).start()

    def start_ready(self, n_probe: int = 64) -> None:
        """Start the system on its empty input and wait until it answers a few probe events
        (it has loaded the model and joined its group): the load then meets a ready system."""
        self.start()
        conf = {"bootstrap.servers": self.ctx.bootstrap_servers, "logger": RDKAFKA_LOG}
        producer = Producer(conf)
        for key, value in itertools.islice(self.pool.stamped(PROBE_SEED), n_probe):
            producer.produce(self.topo.topics.input, value, key)
        producer.flush(30)
        self.wait_for(PROBE_SEED, n_probe, first_timeout_s=self.ctx.plan.start_timeout_s)

    @property
    def peak_rss_bytes(self) -> int:
        return self.sampler.peak_rss_bytes if self.sampler else 0

    def _check_alive(self) -> None:
        for p in self.procs:
            if p.proc.poll() is not None:
                tail = _tail(p.log_path)
                msg = f"{p.name} exited with code {p.proc.returncode}; log {p.log_path}:\n{tail}"
                raise SystemFailed(msg)

    # --- producing -----------------------------------------------------------------------

    def prefill(self, n: int, seed: int) -> float:
        """Produce n events as fast as possible; returns the seconds it took."""
        events = list(itertools.islice(self.pool.stamped(seed), n))
        producer = Producer(
            {
                "bootstrap.servers": self.ctx.bootstrap_servers,
                "logger": RDKAFKA_LOG,
                "linger.ms": 20,
                "batch.num.messages": 10_000,
                "queue.buffering.max.messages": 1_000_000,
                "acks": "all",
            }
        )
        topic = self.topo.topics.input
        t0 = time.monotonic()
        for key, value in events:
            while True:
                try:
                    producer.produce(topic, value, key)
                    break
                except BufferError:
                    producer.poll(0.01)
        left = producer.flush(60)
        if left:
            msg = f"pre-fill: {left} of {n} events not delivered"
            raise SystemFailed(msg)
        return time.monotonic() - t0

    # --- waiting -------------------------------------------------------------------------

    def wait_for(self, seed: int, n: int, *, first_timeout_s: float) -> PhaseStats:
        """Wait until n distinct predictions of the phase arrived, or progress stops."""
        plan = self.ctx.plan
        t0 = last_change = time.monotonic()
        last = -1
        while True:
            count = self.reader.count(seed)
            if count >= n:
                break
            now = time.monotonic()
            if count != last:
                last, last_change = count, now
            if count == 0 and now - t0 > first_timeout_s:
                self._check_alive()
                msg = f"{self.spec.key}: no prediction within {first_timeout_s:.0f}s"
                raise SystemFailed(msg)
            if count > 0 and now - last_change > plan.stall_timeout_s:
                say(f"  {self.spec.key}: stalled at {count:,} of {n:,} predictions")
                break
            self._check_alive()
            time.sleep(0.05)
        return self.reader.phase(seed)

    # --- phases --------------------------------------------------------------------------

    def saturation(self, n: int) -> dict[str, Any]:
        """Pre-fill n events, start the system, time first to last prediction."""
        prefill_s = self.prefill(n, SATURATION_SEED)
        self.start()
        stats = self.wait_for(SATURATION_SEED, n, first_timeout_s=self.ctx.plan.start_timeout_s)
        assert stats.first_recv is not None and stats.last_recv is not None
        window_s = max(1e-9, stats.last_recv - stats.first_recv)
        cpu = self._cpu(stats.first_recv, stats.last_recv)
        received = stats.unique
        out: dict[str, Any] = {}
        scraped = self._scrape_stages()  # since the start: the whole run, one worker
        if scraped is not None:
            out["stages"] = stages.summarize(None, scraped.histograms)
            if txn := stages.transactions(None, scraped):
                out["transactions"] = txn
        return out | {
            "events": n,
            "received": received,
            "duplicates": stats.duplicates,
            "complete": received >= n,
            "prefill_s": round(prefill_s, 3),
            "first_prediction_after_s": round(stats.first_recv - self.started_at, 3),
            "window_s": round(window_s, 3),
            "throughput_eps": received / window_s,
            "throughput_interdecile_eps": interdecile_rate(stats),
            "cpu_s": cpu["system"],
            **_per_1k(cpu, received),
            "loadavg_1m": os.getloadavg()[0],
        }

    def latency(
        self, rate: float, *, duration_s: float, warmup_s: float, seed: int
    ) -> dict[str, Any]:
        """Offer ``rate`` events/s for ``duration_s``; latency percentiles after warm-up, and
        (stream-infer) the worker's latency stages over the same window."""
        t_start, producer = start_open_loop(
            self.ctx.bootstrap_servers,
            self.topo.topics.input,
            self.pool.stamped(seed),
            rate=rate,
            duration_s=duration_s,
        )
        try:
            time.sleep(max(0.0, t_start + warmup_s - time.time()))
            before = self._scrape_stages()
            producer.join(duration_s + 120)
        except BaseException:
            producer.stop(timeout_s=5.0)
            raise
        stats = self.wait_for(seed, producer.sent, first_timeout_s=30.0)
        out = latency_summary(stats, producer, t_start=t_start, warmup_s=warmup_s)
        if before is not None:
            time.sleep(0.3)  # the last batches' delivery is observed after the reader saw them
            after = self._scrape_stages()
            if after is not None:
                out["stages"] = stages.summarize(before.histograms, after.histograms) | out.pop(
                    "stages", {}
                )
                if txn := stages.transactions(before, after):
                    out["transactions"] = txn
        win0, win1 = t_start + warmup_s, t_start + duration_s
        return out | _per_1k(self._cpu(win0, win1), max(1.0, rate * (win1 - win0)))

    def _scrape_stages(self) -> stages.Scrape | None:
        """The worker's histograms and counters (one worker, stream-infer only); None when
        unavailable."""
        if self.spec.kind != "stream-infer" or self.spec.workers != 1:
            return None
        try:
            return stages.scrape(self.topo.worker.web_port)
        except (OSError, ValueError) as exc:
            log.warning("%s: /metrics not read (%s): no stage breakdown", self.spec.key, exc)
            return None

    def _cpu(self, t0: float, t1: float) -> dict[str, float]:
        assert self.sampler is not None
        self.sampler.sample()  # a sample at or after t1
        return self.sampler.cpu_between(t0, t1)


def start_open_loop(
    bootstrap_servers: str,
    topic: str,
    events: Iterator[tuple[bytes, bytes]],
    *,
    rate: float,
    duration_s: float,
) -> tuple[float, OpenLoopProducer]:
    """Start offering ``rate`` events/s for ``duration_s``, in the producer's thread."""
    t_start = time.time()
    producer = OpenLoopProducer(
        {"bootstrap.servers": bootstrap_servers, "logger": RDKAFKA_LOG},
        topic,
        events,
        rate=rate,
        count=max(1, int(rate * duration_s)),
    ).start()
    return t_start, producer


def open_loop(
    bootstrap_servers: str,
    topic: str,
    events: Iterator[tuple[bytes, bytes]],
    *,
    rate: float,
    duration_s: float,
) -> tuple[float, OpenLoopProducer]:
    """Offer ``rate`` events/s for ``duration_s`` (returns once all are produced)."""
    t_start, producer = start_open_loop(
        bootstrap_servers, topic, events, rate=rate, duration_s=duration_s
    )
    try:
        producer.join(duration_s + 120)
    except BaseException:
        producer.stop(timeout_s=5.0)
        raise
    return t_start, producer


def latency_summary(
    stats: PhaseStats, producer: OpenLoopProducer, *, t_start: float, warmup_s: float
) -> dict[str, Any]:
    """Offered and achieved rates, and latency percentiles of the events after warm-up."""
    lat_ms = stats.latencies_s(min_ts=t_start + warmup_s) * 1000.0
    ts = np.frombuffer(stats.ts, dtype=np.float64)
    offered = (len(ts) - 1) / max(1e-9, float(ts.max() - ts.min())) if len(ts) > 1 else 0.0
    span = (stats.last_recv or 0.0) - (stats.first_recv or 0.0)
    out: dict[str, Any] = {
        "target_rate_eps": producer.rate,
        "offered_eps": offered,
        "achieved_eps": stats.unique / span if span > 0 else 0.0,
        "sent": producer.sent,
        "producer_errors": producer.errors,
        "received": stats.unique,
        "duplicates": stats.duplicates,
        "complete": stats.unique >= producer.sent,
        "measured_events": len(lat_ms),
        "loadavg_1m": os.getloadavg()[0],
    }
    if len(lat_ms):
        p50, p99, p999 = np.percentile(lat_ms, [50, 99, 99.9]).tolist()
        out |= {
            "p50_ms": p50,
            "p99_ms": p99,
            "p999_ms": p999,
            "mean_ms": float(lat_ms.mean()),
            "max_ms": float(lat_ms.max()),
        }
    hop_ms = stats.out_hop_s(min_ts=t_start + warmup_s) * 1000.0
    if len(hop_ms):
        hop50, hop99 = np.percentile(hop_ms, [50, 99]).tolist()
        out["stages"] = {
            "out_hop": {
                "count": len(hop_ms),
                "mean_ms": float(hop_ms.mean()),
                "p50_ms": hop50,
                "p99_ms": hop99,
                "p99_bucket_ms": None,  # exact: per event, from the reader
            }
        }
    return out


def measure_floor(
    ctx: BenchContext,
    rates: tuple[float, ...],
    duration_s: float,
    warmup_s: float,
    *,
    first_seed: int = 1,
    announce: bool = True,
) -> dict[str, Any]:
    """Load generator -> broker -> reader with no system in between: the harness's own
    latency, the floor under every system's numbers."""
    topo = load_topology(BASE_TOPOLOGY, env={})
    kafka = KafkaSettings(bootstrap_servers=ctx.bootstrap_servers)
    points = []
    for seed, rate in enumerate(rates, start=first_seed):
        topic = f"bench.{new_run_id('floor')}.events"  # fresh: see SystemRun
        ensure_topics(kafka, [topic], partitions=topo.topics.partitions, replication_factor=1)
        reader = PredictionReader(ctx.bootstrap_servers, [topic]).start()
        try:
            t_start, producer = open_loop(
                ctx.bootstrap_servers,
                topic,
                ctx.pool.stamped(seed),
                rate=rate,
                duration_s=duration_s,
            )
            deadline = time.monotonic() + ctx.plan.stall_timeout_s
            while reader.count(seed) < producer.sent and time.monotonic() < deadline:
                time.sleep(0.05)
            point = latency_summary(
                reader.phase(seed), producer, t_start=t_start, warmup_s=warmup_s
            )
        finally:
            reader.stop()
            delete_topics(ctx.bootstrap_servers, [topic])
        points.append(point)
        if announce:
            say(
                f"floor {rate:,.0f} events/s: p50 {point.get('p50_ms', float('nan')):.1f} ms, "
                f"p99 {point.get('p99_ms', float('nan')):.1f} ms"
            )
    return {"label": "harness floor (no system)", "latency": points}


def warm_up_broker(ctx: BenchContext, rate: float = 5_000.0, duration_s: float = 4.0) -> None:
    """Load generator -> broker -> reader once, unmeasured, before the first measurement.

    A Kafka node that has just started is slow (its JVM compiles the produce and fetch paths as
    they run): the first floor run after start was seen at p50 305 ms, p99 487 ms at 1,000
    events/s, every later one on a fresh topic at p50 6 ms, p99 11-13 ms."""
    warm = measure_floor(ctx, (rate,), duration_s, 0.0, first_seed=900, announce=False)
    point = warm["latency"][0]
    say(
        f"broker warm-up ({rate:,.0f} events/s for {duration_s:g} s, not measured): p99 "
        f"{point.get('p99_ms', float('nan')):.1f} ms"
    )


def delete_topics(bootstrap_servers: str, names: list[str]) -> None:
    """Drop a finished run's topics: tansu keeps every record in memory until then, and the
    next system should find the broker as the first one did."""
    conf: dict[str, Any] = {"bootstrap.servers": bootstrap_servers, "logger": RDKAFKA_LOG}
    admin = AdminClient(conf)
    try:
        for name, future in admin.delete_topics(names, operation_timeout=10).items():
            try:
                future.result(10)
            except KafkaException as exc:
                log.warning("could not delete topic %s: %s", name, exc)
    except KafkaException as exc:
        log.warning("could not delete topics %s: %s", names, exc)


def interdecile_rate(stats: PhaseStats) -> float | None:
    """Predictions per second between the 10th and the 90th percentile of their arrival
    times: a cross-check of ``throughput_eps`` (first to last arrival) that a system whose
    output comes in a few large bursts cannot inflate with its first burst (the first to last
    window leaves out the time before the first burst, which a batch of thousands makes
    large). None with fewer than 10 arrivals or no spread."""
    recv = np.sort(np.frombuffer(stats.recv, dtype=np.float64))
    if len(recv) < 10:
        return None
    t10, t90 = np.percentile(recv, [10, 90]).tolist()
    return 0.8 * len(recv) / (t90 - t10) if t90 > t10 else None


def _per_1k(cpu: dict[str, float], events: float) -> dict[str, float]:
    """CPU seconds per 1,000 events: the system's, the broker's and the harness's."""
    k = max(events, 1e-9) / 1000
    return {
        "cpu_s_per_1k": cpu["system"] / k,
        "broker_cpu_s_per_1k": cpu["broker"] / k,
        "harness_cpu_s_per_1k": cpu["harness"] / k,
    }


def _tail(path: Path, n_bytes: int = 3000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return "(no log)"
    return data[-n_bytes:].decode("utf-8", "replace")


# --- the measurements ------------------------------------------------------------------------


def measure_system(ctx: BenchContext, spec: SystemSpec, n_events: int) -> dict[str, Any]:
    """Saturation, then open-loop latency at fractions of it; each phase a fresh run."""
    plan = ctx.plan
    with SystemRun(ctx, spec) as run:
        say(f"{spec.key}: pre-filling {n_events:,} events, then starting the system")
        sat = run.saturation(n_events)
        peak = run.peak_rss_bytes
    say(
        f"{spec.key}: saturation {sat['throughput_eps']:,.0f} events/s over "
        f"{sat['window_s']:.2f}s, {sat['cpu_s_per_1k']:.3f} CPU s/1k events"
    )
    points = []
    for i, fraction in enumerate(plan.latency_fractions, start=1):
        rate = fraction * sat["throughput_eps"]
        with SystemRun(ctx, spec) as run:
            run.start_ready()
            point = run.latency(
                rate,
                duration_s=plan.latency_duration_s,
                warmup_s=plan.latency_warmup_s,
                seed=i,
            )
            peak = max(peak, run.peak_rss_bytes)
        point["fraction"] = fraction
        points.append(point)
        say(
            f"{spec.key}: {fraction:.0%} = {rate:,.0f} events/s: p50 "
            f"{point.get('p50_ms', float('nan')):.1f} ms, p99 "
            f"{point.get('p99_ms', float('nan')):.1f} ms, p99.9 "
            f"{point.get('p999_ms', float('nan')):.1f} ms"
        )
    say(f"{spec.key}: peak RSS {peak / 2**20:,.0f} MiB")
    return {
        "label": spec.label,
        "kind": spec.kind,
        "batching": _batching(run.topo),
        "guarantee": run.topo.processing.guarantee,
        "workers": spec.workers,
        "saturation": sat,
        "latency": points,
        "peak_rss_bytes": peak,
    }


def measure_sweep_point(
    ctx: BenchContext, spec: SystemSpec, n_events: int, rate: float
) -> dict[str, Any]:
    plan = ctx.plan
    with SystemRun(ctx, spec) as run:
        sat = run.saturation(n_events)
        peak = run.peak_rss_bytes
    with SystemRun(ctx, spec) as run:
        run.start_ready()
        lat = run.latency(
            rate, duration_s=plan.sweep_duration_s, warmup_s=plan.sweep_warmup_s, seed=1
        )
        peak = max(peak, run.peak_rss_bytes)
    b = _batching(run.topo)
    say(
        f"sweep size {b['max_batch_size']:>5} wait {b['max_wait_ms']:>4g} ms: "
        f"{sat['throughput_eps']:,.0f} events/s, p99 at {rate:,.0f}/s "
        f"{lat.get('p99_ms', float('nan')):.1f} ms"
    )
    return {**b, "saturation": sat, "latency": lat, "peak_rss_bytes": peak}


def measure_scale(ctx: BenchContext, spec: SystemSpec, n_events: int) -> dict[str, Any]:
    with SystemRun(ctx, spec) as run:
        sat = run.saturation(n_events)
        peak = run.peak_rss_bytes
        logs = [p.log_path for p in run.procs]
    # One "assigned" line per worker means one join and no rebalance during the run.
    assignments = sum(_count_in(path, "] assigned [") for path in logs)
    say(
        f"scale {spec.workers} worker(s): {sat['throughput_eps']:,.0f} events/s; "
        f"{assignments} partition assignments in the logs"
    )
    return {
        "workers": spec.workers,
        "saturation": sat,
        "peak_rss_bytes": peak,
        "assignments_in_logs": assignments,
    }


def measure_saturation(ctx: BenchContext, spec: SystemSpec, n_events: int) -> dict[str, Any]:
    """One saturation run of ``spec`` (fresh topics, group and process): the saturation
    figures, the workload served and the run's peak RSS."""
    with SystemRun(ctx, spec) as run:
        sat = run.saturation(n_events)
        peak = run.peak_rss_bytes
    return {
        "system": spec.key,
        "label": spec.label,
        "kind": spec.kind,
        "workload": spec.workload.key,
        "saturation": sat,
        "peak_rss_bytes": peak,
    }


def measure_rounds(
    ctx: BenchContext,
    specs: list[SystemSpec],
    events: dict[str, int],
    rounds: int,
) -> list[list[dict[str, Any]]]:
    """``rounds`` rounds, each one saturation run of every spec in turn, the order rotated by
    one each round (round 1: a b c d, round 2: b c d a, ...), so that no system is always first
    or always last in a drift of the machine's load. ``events`` maps a spec's key to its
    pre-filled event count. A failed run is recorded with its error and the round goes on."""
    out: list[list[dict[str, Any]]] = []
    for r in range(rounds):
        order = specs[r % len(specs) :] + specs[: r % len(specs)]
        runs = []
        for spec in order:
            try:
                got = measure_saturation(ctx, spec, events[spec.key])
            except SystemFailed as exc:
                say(f"round {r + 1}: {spec.key} FAILED {exc}")
                runs.append({"system": spec.key, "workload": spec.workload.key, "error": str(exc)})
                continue
            sat = got["saturation"]
            say(
                f"round {r + 1}/{rounds} {spec.workload.key} {spec.key}: "
                f"{sat['throughput_eps']:,.0f} events/s, {sat['cpu_s_per_1k']:.3f} CPU s/1k, "
                f"peak RSS {got['peak_rss_bytes'] / 2**20:,.0f} MiB"
            )
            runs.append(got | {"round": r + 1})
        out.append(runs)
    return out


def _count_in(path: Path, needle: str) -> int:
    try:
        return path.read_text(encoding="utf-8", errors="replace").count(needle)
    except OSError:
        return 0


def _batching(topo: Topology) -> dict[str, Any]:
    b = topo.batching
    return {
        "max_batch_size": b.max_batch_size,
        "max_wait_ms": b.max_wait_ms,
        "max_batches_in_flight": b.max_batches_in_flight,
    }
