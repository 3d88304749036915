"""``stream-infer demo``: the whole system on one machine, visibly.

Starts the embedded broker, creates the example topology's topics, starts a worker process,
produces synthetic events at a fixed rate (with a few malformed ones), and shows what comes
out: events/s, latency, predictions by version, dead letters by reason, batch sizes. Ctrl-C
(or --duration) stops everything; nothing is left running.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.live import Live
from rich.table import Table

from stream_infer.broker import EmbeddedBroker, free_port
from stream_infer.examples import phishing
from stream_infer.io.clients import ensure_topology_topics
from stream_infer.loadgen import OpenLoopProducer, synthetic_events, with_bad_events
from stream_infer.settings import ENV_PREFIX, Topology, load_topology
from stream_infer.watch import OutputWatcher

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TOPOLOGY = ROOT / "topologies" / "phishing.yaml"


def ensure_example_models(topology: Topology, console: Console) -> None:
    missing = [v.path for m in topology.models for v in m.versions if not v.path.exists()]
    if missing and topology.features == phishing.FEATURES:
        out = missing[0].parent.parent
        console.print(f"building the example models into {out} ...")
        phishing.build(out)


def scrape_batches(port: int) -> tuple[float, float] | None:
    """(batches, records) from the worker's /metrics, or None if it is not up yet."""
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=0.5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    samples = {
        s.name: s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name in {"stream_infer_batch_size_count", "stream_infer_batch_size_sum"}
    }
    return samples.get("stream_infer_batch_size_count", 0.0), samples.get(
        "stream_infer_batch_size_sum", 0.0
    )


def _table(
    snap: dict[str, Any], sent: int, elapsed: float, rate: float, batches: tuple[float, float]
) -> Table:
    table = Table(title=f"stream-infer demo: {elapsed:5.0f}s, offered {rate:,.0f} events/s")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("events produced", f"{sent:,}")
    table.add_row("predictions received", f"{snap['predictions']:,}")
    table.add_row("predictions/s (last 5 s)", f"{snap['rate']:,.0f}")
    p50, p99 = snap["p50_ms"], snap["p99_ms"]
    table.add_row(
        "latency p50 / p99 (event ts to received)",
        f"{p50:.1f} / {p99:.1f} ms" if p50 is not None else "-",
    )
    n_batches, n_records = batches
    mean = f"{n_records / n_batches:.1f}" if n_batches else "-"
    table.add_row("batches / mean batch size", f"{n_batches:,.0f} / {mean}")
    for version, n in sorted(snap["by_version"].items()):
        table.add_row(f"  served by {version}", f"{n:,}")
    for reason, n in sorted(snap["dead_letters"].items()):
        table.add_row(f"  dead letter: {reason}", f"{n:,}")
    return table


def run_demo(
    topology_path: Path = DEFAULT_TOPOLOGY,
    *,
    rate: float = 2000.0,
    duration_s: float | None = None,
    bad_fraction: float = 0.005,
) -> int:
    console = Console()
    workdir = ROOT / ".demo"
    workdir.mkdir(exist_ok=True)
    with EmbeddedBroker(log_path=workdir / "broker.log") as broker:
        web_port = free_port()
        env = dict(os.environ)
        env[ENV_PREFIX + "KAFKA__BOOTSTRAP_SERVERS"] = broker.bootstrap_servers
        env[ENV_PREFIX + "KAFKA__GROUP_ID"] = f"stream-infer-demo-{int(time.time())}"
        env[ENV_PREFIX + "WORKER__WEB_PORT"] = str(web_port)
        topology = load_topology(topology_path, env=env)
        ensure_example_models(topology, console)
        console.print(f"embedded broker (tansu) on {broker.bootstrap_servers}")
        ensure_topology_topics(topology)
        log_path = workdir / "worker.log"
        console.print(f"worker log: {log_path}; metrics: http://127.0.0.1:{web_port}/metrics")
        with log_path.open("wb") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "stream_infer", "worker", str(topology_path)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        watcher = OutputWatcher(
            topology.kafka,
            prediction_topics=[topology.prediction_topic(m) for m in topology.models],
            dead_letter_topic=topology.topics.dead_letter,
        ).start()
        events = with_bad_events(synthetic_events(topology), bad_fraction)
        producer = OpenLoopProducer(
            topology.kafka.librdkafka(), topology.topics.input, events, rate=rate
        ).start()
        started = time.monotonic()
        code = 0
        try:
            with Live(console=console, refresh_per_second=2) as live:
                while duration_s is None or time.monotonic() - started < duration_s:
                    if worker.poll() is not None:
                        console.print(
                            f"[red]the worker exited with {worker.returncode}; see {log_path}[/red]"
                        )
                        code = 1
                        break
                    batches = scrape_batches(web_port) or (0.0, 0.0)
                    elapsed = time.monotonic() - started
                    live.update(_table(watcher.snapshot(), producer.sent, elapsed, rate, batches))
                    time.sleep(0.5)
        except KeyboardInterrupt:
            console.print("stopping ...")
        finally:
            producer.stop()
            _drain(watcher, producer.sent, timeout_s=15.0)
            worker.terminate()
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
            watcher.stop()
        snap = watcher.snapshot()
        dead = sum(snap["dead_letters"].values())
        console.print(
            f"produced {producer.sent:,} events: {snap['unique_ids']:,} predicted "
            f"({snap['duplicates']:,} duplicates), {dead:,} dead letters, "
            f"{producer.sent - snap['unique_ids'] - dead:,} unaccounted"
        )
        return code


def _drain(watcher: OutputWatcher, sent: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        snap = watcher.snapshot()
        if snap["unique_ids"] + sum(snap["dead_letters"].values()) >= sent:
            return
        time.sleep(0.2)
