"""Commands for one machine: a local ``broker``, the ``demo``, ``produce`` (the load
generator) and ``build-example-models``."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from stream_infer.cli.common import LOG_LEVEL, TOPOLOGY, load


@click.command()
@click.option("--port", default=9092, show_default=True, help="0 picks a free port")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option(
    "--kafka",
    "apache_kafka",
    is_flag=True,
    help="Apache Kafka (KRaft, resolved from Maven Central; needs Java 17+ and Maven) "
    "instead of tansu, its data in a temporary folder",
)
@click.option("--nodes", default=1, show_default=True, help="with --kafka: cluster size")
@LOG_LEVEL
def broker(port: int, host: str, apache_kafka: bool, nodes: int) -> None:
    """Run a local broker until Ctrl-C: the embedded tansu (in memory), or Apache Kafka."""
    if apache_kafka:
        from stream_infer.local.apache_kafka import KafkaCluster

        with KafkaCluster(nodes, host=host, client_port=port) as cluster:
            click.echo(
                f"Apache Kafka {cluster.version} ({nodes} KRaft node(s)) listening on "
                f"{cluster.bootstrap_servers}, started in {cluster.started_in_s:.1f} s; "
                "Ctrl-C stops it and removes its data"
            )
            _wait_for_signal()
        return
    from stream_infer.local.tansu import EmbeddedBroker

    with EmbeddedBroker(port, host=host) as b:
        click.echo(f"embedded broker (tansu) listening on {b.bootstrap_servers}; Ctrl-C stops it")
        click.echo("it keeps everything in memory: a restart loses all topics and offsets")
        _wait_for_signal()


def _wait_for_signal() -> None:
    stop = {"now": False}

    def handler(_sig: int, _frame: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, handler)
    try:
        while not stop["now"]:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass


@click.command()
@TOPOLOGY
@click.option(
    "--rate",
    default=1000.0,
    show_default=True,
    type=click.FloatRange(min=0.001),
    help="events per second",
)
@click.option("--count", type=click.IntRange(min=1), help="stop after this many events")
@click.option(
    "--file",
    "jsonl",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="send the events of this JSON-lines file instead of synthetic ones: one event per "
    'line, as the worker reads it, e.g. {"id": "e1", "features": {"https": 1, ...}, '
    '"ts": 1700000000.0}; a "key" field sets the Kafka key (else the "id"); a line that is '
    "not JSON is sent as is (the worker dead-letters it)",
)
@click.option(
    "--bad-fraction",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0.0, 1.0),
    help="mix in malformed events",
)
@click.option(
    "--seed",
    type=int,
    help="repeat a run: the same events with the same ids (default: new ids every run)",
)
def produce(
    topology: Path,
    rate: float,
    count: int | None,
    jsonl: Path | None,
    bad_fraction: float,
    seed: int | None,
) -> None:
    """Produce feature events to TOPOLOGY's input topic at a fixed rate (synthetic ones, or
    those of --file)."""
    from rich.progress import Progress

    from stream_infer.io.clients import check_reachable
    from stream_infer.local.loadgen import (
        OpenLoopProducer,
        jsonl_events,
        synthetic_events,
        with_bad_events,
    )

    topo = load(topology)
    check_reachable(topo.kafka)
    events = jsonl_events(jsonl) if jsonl else synthetic_events(topo, seed)
    events = with_bad_events(events, bad_fraction, seed or 0)
    producer = OpenLoopProducer(
        topo.kafka.librdkafka(), topo.topics.input, events, rate=rate, count=count
    ).start()
    try:
        with Progress(transient=False) as progress:
            task = progress.add_task(f"producing to {topo.topics.input}", total=count)
            while producer._thread.is_alive():
                progress.update(task, completed=producer.sent)
                time.sleep(0.2)
            progress.update(task, completed=producer.sent)
    except KeyboardInterrupt:
        pass
    finally:
        producer.stop()
    click.echo(f"sent {producer.sent} events ({producer.errors} delivery errors)")
    if producer.errors:
        sys.exit(1)


@click.command()
@click.option(
    "--topology",
    "topology_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="default: topologies/phishing-online.yaml",
)
@click.option(
    "--rate",
    default=1000.0,
    show_default=True,
    type=click.FloatRange(min=1),
    help="events per second offered",
)
@click.option("--duration", type=click.FloatRange(min=1), help="seconds; default until Ctrl-C")
@click.option("--bad-fraction", default=0.005, show_default=True, type=click.FloatRange(0.0, 1.0))
@click.option(
    "--drift-at",
    default=40.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="seconds until the concept flips (labels invert); 0: never",
)
@click.option(
    "--rollout",
    is_flag=True,
    help="show label-driven rollouts instead: v3-degraded aborted at its first gate, then v2 "
    "promoted step by step (no canary, no drift)",
)
@LOG_LEVEL
def demo(
    topology_path: Path | None,
    rate: float,
    duration: float | None,
    bad_fraction: float,
    drift_at: float,
    rollout: bool,
) -> None:
    """Broker, worker, events in, predictions out, on this machine. Ctrl-C stops it all."""
    from stream_infer.local.demo import DEFAULT_TOPOLOGY, run_demo

    sys.exit(
        run_demo(
            topology_path or DEFAULT_TOPOLOGY,
            rate=rate,
            duration_s=duration,
            bad_fraction=bad_fraction,
            drift_at_s=drift_at or None,
            rollout=rollout,
        )
    )


@click.command("build-example-models")
@click.option(
    "--out",
    default="models/phishing",
    show_default=True,
    type=click.Path(path_type=Path, file_okay=False),
)
@LOG_LEVEL
def build_example_models(out: Path) -> None:
    """Train the phishing example's model versions (seeded) and write them to OUT: v1, v2 and
    v3-degraded, a deliberately worse one (trained on shuffled labels) for backtests and
    rollouts to reject."""
    from stream_infer.examples import phishing

    for version, meta in phishing.build(out).items():
        click.echo(f"{version}: {meta.format} {meta.sha256[:12]} {meta.description}")
