"""``stream-infer demo``: the whole system on one machine, visibly.

Starts the embedded broker, creates the example topology's topics, starts a worker process,
splits traffic 90/10 between model v1 and a canary v2, produces synthetic events at a fixed rate
(a few malformed), and labels every served event a second later from the dataset's ground
truth. At ``--drift-at`` seconds the world changes (the concept flips: every label inverts):
ADWIN catches the error drift, the policies retire the canary and move traffic to the online
learner, which re-learns. The live table shows events/s, latency, batches, predictions by
version, dead letters by reason, the routing in force, drift events and each version's
rolling accuracy. Ctrl-C (or ``--duration``) stops everything; nothing is left running.

With ``rollout=True`` (``stream-infer demo --rollout``) it shows label-driven rollouts instead
of the canary and the drift: the topology gets the deliberately degraded ``v3-degraded``
version and no drift policies (a policy's swap would cancel a rollout); a rollout of
``v3-degraded`` is aborted at its first gate (the shadow step), then one of ``v2`` is promoted
step by step (0 -> 5 % -> 25 % -> 50 % -> 100 %). The live table shows the step, the weight,
each version's labels and error rate with its anytime-valid bounds, the bounds on the
difference against the margin, and every decision.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import yaml
from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.live import Live
from rich.table import Table

from stream_infer.examples import phishing
from stream_infer.io.clients import ensure_topology_topics
from stream_infer.io.controller import Controller, new_command
from stream_infer.io.watch import OutputWatcher
from stream_infer.local.loadgen import (
    OpenLoopProducer,
    close_producer,
    synthetic_events,
    with_bad_events,
)
from stream_infer.local.tansu import EmbeddedBroker, free_port
from stream_infer.settings import ENV_PREFIX, Topology, load_topology

ROOT = Path(__file__).resolve().parents[2]  # the checkout: stream_infer/local/demo.py
DEFAULT_TOPOLOGY = ROOT / "topologies" / "phishing-online.yaml"
# The demo's producers send 100 ms of events per request (linger), so each partition gets about
# ten record batches a second. tansu keeps a partition's batches in memory and its fetches
# collapse past roughly 15,000 of them (measured: a fetch at the end of a partition of 10,000
# single-record batches took 0.37 s, of 20,000 it never returned). At librdkafka's 5 ms the
# input topic got ~200 batches/s per partition and the demo stalled after 65 to 90 s.
DEMO_LINGER_MS = 100.0


def ensure_example_models(topology: Topology, console: Console) -> None:
    missing = [v.path for m in topology.models for v in m.versions if not v.path.exists()]
    if missing and topology.features == phishing.FEATURES:
        out = missing[0].parent.parent
        console.print(f"building the example models into {out} ...")
        phishing.build(out)


def scrape(port: int) -> dict[str, float]:
    """The worker's metrics as {"name{label=value,...}": value}; empty if it is not up."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=0.5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


class Labeler:
    """Labels each served event ``delay_s`` after its prediction, from the ground truth; after
    ``flip_at`` (monotonic time) the concept flips and every label is inverted."""

    def __init__(self, conf: dict[str, Any], topic: str, delay_s: float, flip_at: float | None):
        self.topic = topic
        self.delay_s = delay_s
        self.flip_at = flip_at
        self.truth: dict[str, tuple[bytes, bool]] = {}
        self.sent = 0
        self._due: deque[tuple[float, str]] = deque()
        self._producer = Producer(conf | {"linger.ms": DEMO_LINGER_MS})
        self._closed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="labeler", daemon=True)
        self._thread.start()

    @property
    def flipped(self) -> bool:
        return self.flip_at is not None and time.monotonic() >= self.flip_at

    def events(self, seed: int = 0) -> Iterator[tuple[bytes, bytes]]:
        """Feature events (key, value) whose ground truth this labeler keeps."""
        for n, (event_id, features, label) in enumerate(phishing.events(seed)):
            key = f"entity-{n % 50_000}".encode()
            self.truth[event_id] = (key, label)
            yield key, orjson.dumps({"id": event_id, "features": features, "ts": time.time()})

    def on_record(self, _topic: str, doc: dict[str, Any]) -> None:
        if "prediction" in doc:
            self._due.append((time.monotonic() + self.delay_s, str(doc["id"])))

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            flip = self.flipped
            while self._due and self._due[0][0] <= now:
                _, event_id = self._due.popleft()
                known = self.truth.pop(event_id, None)
                if known is None:
                    continue  # a duplicate prediction: labelled already
                key, label = known
                doc = {"id": event_id, "label": (not label) if flip else label}
                self._producer.produce(self.topic, orjson.dumps(doc), key)
                self.sent += 1
            self._producer.poll(0)
            time.sleep(0.02)
        self._producer.flush(10)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)
        if not self._thread.is_alive() and not self._closed:
            self._closed = True
            close_producer(self._producer)


# The demo's rollouts: accuracy within 5 points, 300 labels per version at each step.
ROLLOUT_PLAN: dict[str, Any] = {
    "steps": [0.0, 0.05, 0.25, 0.5, 1.0],
    "metric": "accuracy",
    "margin": 0.05,
    "confidence": 0.95,
    "min_labels": 300,
    "max_duration_s": 60.0,
    "on_timeout": "abort",
}
ROLLOUT_CANDIDATES = ("v3-degraded", "v2")  # the worse one first: it is aborted, then v2


def rollout_topology(topology_path: Path, out: Path) -> Path:
    """The demo topology for rollouts: ``topology_path`` with ``v3-degraded`` beside its
    first model's versions (from the same folder), labels joined for rollouts, and no drift
    policies. Model paths become absolute (the file is written elsewhere)."""
    doc = yaml.safe_load(topology_path.read_text(encoding="utf-8"))
    base = topology_path.resolve().parent
    for model in doc["models"]:
        for version in model["versions"]:
            version["path"] = str((base / version["path"]).resolve())
    first = doc["models"][0]
    names = [v["version"] for v in first["versions"]]
    if "v3-degraded" not in names and names:
        sibling = Path(first["versions"][0]["path"]).parent / "v3-degraded"
        first["versions"].append({"version": "v3-degraded", "path": str(sibling)})
    online = doc.setdefault("online", {})
    online["policies"] = []
    online["rollouts"] = True
    out.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return out


class RolloutScript:
    """Sends the demo's rollouts one after the other and keeps what each decided, from the
    worker's metrics (the worker drives: it owns every partition)."""

    def __init__(self, topology: Topology, candidates: tuple[str, ...]) -> None:
        self.topology = topology
        self.model = topology.models[0].name
        declared = topology.versions_of(self.model)
        self.pending = [c for c in candidates if c in declared]
        self.current: str | None = None
        self.history: list[str] = []
        self._seen: dict[str, float] = {}
        # Whether the worker's gauge has shown the current rollout running (it is set once a
        # second: right after the ack it may still say none runs).
        self._seen_running = False

    def step(self, metrics: dict[str, float], console: Console) -> None:
        """Start the next rollout once none runs; note new decisions."""
        for key, value in sorted(metrics.items()):
            if not key.startswith("stream_infer_rollout_decisions_total{"):
                continue
            if value > self._seen.get(key, 0.0):
                decision = key.split("decision=")[1].split(",")[0].rstrip("}")
                self.history.append(f"{self.current}: {decision}")
                self._seen[key] = value
        running = metrics.get(f"stream_infer_rollout_running{{model={self.model}}}", 0.0)
        self._seen_running |= bool(running)
        finished = self.current is None or (self._seen_running and not running)
        if not finished or not self.pending:
            return
        candidate = self.pending.pop(0)
        ctl = Controller(self.topology)
        try:
            cmd = new_command("rollout", model=self.model, version=candidate, plan=ROLLOUT_PLAN)
            sent = ctl.send(cmd)
            acks = ctl.acks(sent["id"], wait_s=10, workers=1)
        finally:
            ctl.close()
        refused = [a for a in acks if a.get("status") == "rejected"]
        if refused:
            console.print(f"control: rollout of {candidate} rejected: {refused[0].get('detail')}")
            return
        self.current, self._seen_running = candidate, False
        self.history.append(f"{candidate}: rollout started")
        console.print(f"control: rollout of {candidate} ({sent['id']})")

    def rows(self, metrics: dict[str, float]) -> list[tuple[str, str]]:
        model, out = self.model, []
        running = metrics.get(f"stream_infer_rollout_running{{model={model}}}", 0.0)
        step = metrics.get(f"stream_infer_rollout_step{{model={model}}}")
        weight = metrics.get(f"stream_infer_rollout_weight{{model={model}}}")
        if self.current is None:
            return [("rollout", "starting ...")]
        state = (
            f"step {step:.0f} of {len(ROLLOUT_PLAN['steps']) - 1}, weight {weight:.0%}"
            if running and step is not None and weight is not None
            else "finished"
        )
        out.append((f"rollout of {self.current}", state))
        serving = self.topology.models[0].serving
        for version in (self.current, serving):
            labels = metrics.get(f"stream_infer_rollout_labels{{model={model},version={version}}}")
            stats = {
                stat: metrics.get(
                    "stream_infer_rollout_evidence{"
                    f"metric=accuracy,model={model},stat={stat},version={version}}}"
                )
                for stat in ("mean", "lower", "upper")
            }
            if labels is None or stats["mean"] is None:
                continue
            out.append(
                (
                    f"  {version}: labels, error rate [bounds]",
                    f"{labels:,.0f}, {stats['mean']:.3f} "
                    f"[{stats['lower'] or 0:.3f}, {stats['upper'] or 0:.3f}]",
                )
            )
        low = metrics.get(f"stream_infer_rollout_difference{{bound=lower,model={model}}}")
        high = metrics.get(f"stream_infer_rollout_difference{{bound=upper,model={model}}}")
        if low is not None and high is not None:
            out.append(
                (
                    "  error(candidate) - error(incumbent)",
                    f"[{low:+.3f}, {high:+.3f}] vs margin {ROLLOUT_PLAN['margin']:+.3f}",
                )
            )
        for line in self.history[-8:]:
            out.append(("  decision", line))
        return out


def _table(
    state: dict[str, Any], metrics: dict[str, float], rollout: RolloutScript | None = None
) -> Table:
    elapsed, rate, snap = state["elapsed"], state["rate"], state["snap"]
    flip = state["flip_in"]
    title = f"stream-infer demo: {elapsed:4.0f}s, offered {rate:,.0f} events/s"
    if flip is not None:
        title += f", concept flips in {flip:.0f}s" if flip > 0 else ", concept FLIPPED"
    table = Table(title=title)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("events produced / labels sent", f"{state['sent']:,} / {state['labels']:,}")
    table.add_row("predictions received", f"{snap['predictions']:,}")
    table.add_row("predictions/s (last 5 s)", f"{snap['rate']:,.0f}")
    p50, p99 = snap["p50_ms"], snap["p99_ms"]
    table.add_row(
        "latency p50 / p99 (event ts to received)",
        f"{p50:.1f} / {p99:.1f} ms" if p50 is not None else "-",
    )
    n = metrics.get("stream_infer_batch_size_count", 0.0)
    total = metrics.get("stream_infer_batch_size_sum", 0.0)
    table.add_row("batches / mean batch size", f"{n:,.0f} / {total / n:.1f}" if n else "-")
    for version, count in sorted(snap["by_version"].items()):
        table.add_row(f"  served by {version}", f"{count:,}")
    for reason, count in sorted(snap["dead_letters"].items()):
        table.add_row(f"  dead letter: {reason}", f"{count:,}")
    weights = {
        k.split("version=")[1].rstrip("}"): v
        for k, v in metrics.items()
        if k.startswith("stream_infer_route_weight{") and v > 0
    }
    table.add_row("routing in force", ", ".join(f"{v} {w:.0%}" for v, w in sorted(weights.items())))
    drifts = {
        k.split("{")[1].rstrip("}"): v
        for k, v in metrics.items()
        if k.startswith("stream_infer_drift_events_total{")
    }
    table.add_row(
        "drift events", ", ".join(f"{k}: {v:.0f}" for k, v in sorted(drifts.items())) or "none"
    )
    for key, value in sorted(metrics.items()):
        if key.startswith("stream_infer_prequential{") and "metric=rolling_accuracy" in key:
            version = key.split("version=")[1].rstrip("}")
            table.add_row(f"  rolling accuracy {version}", f"{value:.3f}")
    if rollout is not None:
        for what, shown in rollout.rows(metrics):
            table.add_row(what, shown)
    return table


def _wait_ready(port: int, worker: subprocess.Popen[bytes], timeout_s: float = 90) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and worker.poll() is None:
        if scrape(port).get("stream_infer_ready") == 1.0:
            return True
        time.sleep(0.3)
    return False


def run_demo(
    topology_path: Path = DEFAULT_TOPOLOGY,
    *,
    rate: float = 1000.0,
    duration_s: float | None = None,
    bad_fraction: float = 0.005,
    drift_at_s: float | None = 40.0,
    rollout: bool = False,
) -> int:
    console = Console()
    workdir = ROOT / ".demo"
    workdir.mkdir(exist_ok=True)
    if rollout:  # rollouts instead of the canary and the drift
        topology_path = rollout_topology(topology_path, workdir / "rollout-topology.yaml")
        drift_at_s = None
    with EmbeddedBroker(log_path=workdir / "broker.log") as broker:
        demo = _Demo(console, workdir, topology_path, broker.bootstrap_servers)
        demo.rollout = rollout
        console.print(f"embedded broker (tansu) on {broker.bootstrap_servers}")
        try:
            return demo.run(rate, duration_s, bad_fraction, drift_at_s)
        except KeyboardInterrupt:
            console.print("stopping ...")
            return 0
        finally:
            demo.stop()
            demo.summary()


class _Demo:
    """One demo run: the worker process, the producer, the labeler and the watcher."""

    def __init__(self, console: Console, workdir: Path, topology_path: Path, bootstrap: str):
        self.console = console
        self.topology_path = topology_path
        self.web_port = free_port()
        self.env = dict(os.environ)
        self.env[ENV_PREFIX + "KAFKA__BOOTSTRAP_SERVERS"] = bootstrap
        self.env[ENV_PREFIX + "KAFKA__GROUP_ID"] = f"stream-infer-demo-{int(time.time())}"
        self.env[ENV_PREFIX + "WORKER__WEB_PORT"] = str(self.web_port)
        # tansu holds a fetch that finds nothing for all of fetch.wait.max.ms, even when a
        # record arrives meanwhile: keep that short here (Apache Kafka does not need it).
        self.env.setdefault(ENV_PREFIX + "KAFKA__FETCH_WAIT_MAX_MS", "10")
        self.topology = load_topology(topology_path, env=self.env)
        ensure_example_models(self.topology, console)
        ensure_topology_topics(self.topology)
        self.log_path = workdir / "worker.log"
        with self.log_path.open("wb") as log:
            self.worker = subprocess.Popen(
                [sys.executable, "-m", "stream_infer", "worker", str(topology_path)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        console.print(
            f"worker log: {self.log_path}; metrics: http://127.0.0.1:{self.web_port}/metrics"
        )
        self.labeler: Labeler | None = None
        self.producer: OpenLoopProducer | None = None
        self.watcher: OutputWatcher | None = None
        self.rollout = False

    def run(
        self, rate: float, duration_s: float | None, bad_fraction: float, drift_at_s: float | None
    ) -> int:
        self.console.print("starting the worker (loading and warming up the models) ...")
        if not _wait_ready(self.web_port, self.worker):
            self.console.print(f"[red]the worker did not become ready; see {self.log_path}[/red]")
            return 1
        script = RolloutScript(self.topology, ROLLOUT_CANDIDATES) if self.rollout else None
        if script is None:
            self._split_canary()
        topology = self.topology
        started = time.monotonic()
        flip_at = started + drift_at_s if drift_at_s else None
        if topology.online.enabled and topology.topics.labels:
            self.labeler = Labeler(
                topology.kafka.librdkafka(), topology.topics.labels, 1.0, flip_at
            )
        self.watcher = OutputWatcher(
            topology.kafka,
            prediction_topics=[topology.prediction_topic(m) for m in topology.models],
            dead_letter_topic=topology.topics.dead_letter,
            on_record=self.labeler.on_record if self.labeler else None,
        ).start()
        source = self.labeler.events() if self.labeler else synthetic_events(topology)
        self.producer = OpenLoopProducer(
            topology.kafka.librdkafka(),
            topology.topics.input,
            with_bad_events(source, bad_fraction),
            rate=rate,
            linger_ms=DEMO_LINGER_MS,
        ).start()
        with Live(console=self.console, refresh_per_second=2) as live:
            while duration_s is None or time.monotonic() - started < duration_s:
                if self.worker.poll() is not None:
                    self.console.print(
                        f"[red]the worker exited with {self.worker.returncode}; "
                        f"see {self.log_path}[/red]"
                    )
                    return 1
                now = time.monotonic()
                state = {
                    "elapsed": now - started,
                    "rate": rate,
                    "snap": self.watcher.snapshot(),
                    "sent": self.producer.sent,
                    "labels": self.labeler.sent if self.labeler else 0,
                    "flip_in": (flip_at - now) if flip_at else None,
                }
                metrics = scrape(self.web_port)
                if script is not None and now - started >= 2.0:  # labels flowing first
                    script.step(metrics, self.console)
                live.update(_table(state, metrics, script))
                time.sleep(0.5)
        return 0

    def _split_canary(self) -> None:
        model = self.topology.models[0]
        canary = [v.version for v in model.versions if v.version != model.serving][:1]
        if not canary:
            return
        ctl = Controller(self.topology)
        weights = {model.serving: 0.9, canary[0]: 0.1}
        sent = ctl.send(new_command("split", model=model.name, weights=weights))
        ctl.acks(sent["id"], wait_s=10, workers=1)
        ctl.close()
        self.console.print(f"control: split {model.serving} 90% / {canary[0]} 10% (canary)")

    def stop(self) -> None:
        if self.producer is not None:
            self.producer.stop()
            if self.watcher is not None:
                _drain(self.watcher, self.producer.sent, timeout_s=15.0)
        if self.labeler is not None:
            self.labeler.stop()
        self.worker.terminate()
        try:
            self.worker.wait(30)
        except subprocess.TimeoutExpired:
            self.worker.kill()
            self.worker.wait()
        if self.watcher is not None:
            self.watcher.stop()

    def summary(self) -> None:
        if self.watcher is None or self.producer is None:
            return
        snap = self.watcher.snapshot()
        dead = sum(snap["dead_letters"].values())
        waiting = self.producer.sent - snap["unique_ids"] - dead
        self.console.print(
            f"produced {self.producer.sent:,} events: {snap['unique_ids']:,} predicted "
            f"({snap['duplicates']:,} duplicates), {dead:,} dead letters, {waiting:,} not yet "
            "served when the demo stopped (uncommitted: a restarted worker would serve them)"
        )


def _drain(watcher: OutputWatcher, sent: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        snap = watcher.snapshot()
        if snap["unique_ids"] + sum(snap["dead_letters"].values()) >= sent:
            return
        time.sleep(0.2)
