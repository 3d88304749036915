"""The one command line: ``stream-infer broker | worker | produce | tail | demo | ...``.

Errors a user can fix (an invalid topology, an unreachable broker, a bad argument) print one
clear message, no traceback: exit code 2 for invalid input, 1 for a broker that cannot be
reached.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import orjson

from stream_infer.errors import BrokerError, ConfigError, ModelError, StreamInferError

F = TypeVar("F", bound=Callable[..., Any])
TOPOLOGY = click.argument(
    "topology", type=click.Path(path_type=Path, dir_okay=False), metavar="TOPOLOGY"
)


def _load(path: Path) -> Any:
    from stream_infer.settings import load_topology

    return load_topology(path)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@click.pass_context
def cli(ctx: click.Context, log_level: str) -> None:
    """Streaming inference for Kafka: micro-batched torch models behind a control topic."""
    from stream_infer.observability import configure_logging

    ctx.obj = {"log_level": log_level}
    configure_logging(log_level)


@cli.command()
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
def broker(port: int, host: str, apache_kafka: bool, nodes: int) -> None:
    """Run a local broker until Ctrl-C: the embedded tansu (in memory), or Apache Kafka."""
    if apache_kafka:
        from stream_infer.apache_kafka import KafkaCluster

        with KafkaCluster(nodes, host=host, client_port=port) as cluster:
            click.echo(
                f"Apache Kafka {cluster.version} ({nodes} KRaft node(s)) listening on "
                f"{cluster.bootstrap_servers}, started in {cluster.started_in_s:.1f} s; "
                "Ctrl-C stops it and removes its data"
            )
            _wait_for_signal()
        return
    from stream_infer.broker import EmbeddedBroker

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


@cli.command()
@TOPOLOGY
@click.pass_context
def worker(ctx: click.Context, topology: Path) -> None:
    """Run one worker of TOPOLOGY in the foreground (SIGINT/SIGTERM stop it cleanly)."""
    from stream_infer.io.clients import check_reachable, ensure_topology_topics
    from stream_infer.runtime.app import run_worker

    topo = _load(topology)
    check_reachable(topo.kafka)
    # Topics it cannot run on (a control topic that loses commands) are refused here, before
    # anything starts: exit code 2. Input and labels partitioned differently are an ERROR line
    # and a /healthz warning, as when a running worker sees them: not an exit (a scale-out of
    # the input topic alone would otherwise make every restarted worker exit).
    ensure_topology_topics(topo)
    sys.exit(run_worker(topo, loglevel=ctx.obj["log_level"]))


@cli.command()
@TOPOLOGY
def topics(topology: Path) -> None:
    """Create TOPOLOGY's topics (with their partition counts) if they do not exist, and check
    the existing ones: a control topic that would lose commands (more than one partition, finite
    retention) and input and labels topics partitioned differently are refused (exit code 2)."""
    from stream_infer.io.clients import ensure_topology_topics

    created = ensure_topology_topics(_load(topology), refuse_copartition=True)
    click.echo(f"created {created}" if created else "all topics exist")


@cli.command()
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
    help="send the events of this JSON-lines file instead of synthetic ones",
)
@click.option(
    "--bad-fraction",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0.0, 1.0),
    help="mix in malformed events",
)
@click.option("--seed", default=0, show_default=True)
def produce(
    topology: Path,
    rate: float,
    count: int | None,
    jsonl: Path | None,
    bad_fraction: float,
    seed: int,
) -> None:
    """Produce feature events to TOPOLOGY's input topic at a fixed rate."""
    from rich.progress import Progress

    from stream_infer.io.clients import check_reachable
    from stream_infer.loadgen import (
        OpenLoopProducer,
        jsonl_events,
        synthetic_events,
        with_bad_events,
    )

    topo = _load(topology)
    check_reachable(topo.kafka)
    events = jsonl_events(jsonl) if jsonl else synthetic_events(topo, seed)
    events = with_bad_events(events, bad_fraction, seed)
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


@cli.command()
@TOPOLOGY
@click.option(
    "--what",
    default="predictions",
    show_default=True,
    type=click.Choice(["predictions", "dead-letters", "shadow", "acks", "drift"]),
)
@click.option("--from-beginning", is_flag=True, help="start at the oldest record")
@click.option("--count", type=click.IntRange(min=1), help="exit after this many records")
def tail(topology: Path, what: str, from_beginning: bool, count: int | None) -> None:
    """Print records of one of TOPOLOGY's output topics as JSON lines."""
    from confluent_kafka import Consumer

    from stream_infer.io.clients import check_reachable, consume_ready
    from stream_infer.watch import assign_all

    topo = _load(topology)
    check_reachable(topo.kafka)
    names = {
        "predictions": [topo.prediction_topic(m) for m in topo.models],
        "dead-letters": [topo.topics.dead_letter],
        "shadow": [topo.topics.shadow],
        "acks": [topo.topics.acks],
        "drift": [topo.topics.drift],
    }[what]
    topic_names = [n for n in dict.fromkeys(names) if n]
    if not topic_names:
        raise ConfigError(f"the topology declares no {what} topic")
    consumer = Consumer(topo.kafka.librdkafka() | {"group.id": "stream-infer-tail"})
    assign_all(consumer, topic_names, from_beginning=from_beginning)
    seen = 0
    try:
        while count is None or seen < count:
            for msg in consume_ready(consumer, 500, 0.5):
                if msg.error():
                    continue
                value = msg.value() or b""
                try:
                    click.echo(orjson.dumps(orjson.loads(value)).decode())
                except orjson.JSONDecodeError:
                    click.echo(repr(value))
                seen += 1
                if count is not None and seen >= count:
                    break
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()


@cli.command()
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
def demo(
    topology_path: Path | None,
    rate: float,
    duration: float | None,
    bad_fraction: float,
    drift_at: float,
) -> None:
    """Broker, worker, events in, predictions out, on this machine. Ctrl-C stops it all."""
    from stream_infer.demo import DEFAULT_TOPOLOGY, run_demo

    sys.exit(
        run_demo(
            topology_path or DEFAULT_TOPOLOGY,
            rate=rate,
            duration_s=duration,
            bad_fraction=bad_fraction,
            drift_at_s=drift_at or None,
        )
    )


@cli.command()
@TOPOLOGY
@click.argument(
    "command",
    type=click.Choice(
        ["swap", "split", "shadow", "unshadow", "rollback", "status", "reset_learner"]
    ),
)
@click.option("--model", help="the model the command is about")
@click.option("--version", "version", help="swap: the version to serve; shadow: the candidate")
@click.option(
    "--weight",
    "weights",
    multiple=True,
    metavar="VERSION=WEIGHT",
    help="split: repeat for each version, weights summing to 1",
)
@click.option(
    "--wait",
    default=5.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="seconds to wait for the workers' acks",
)
@click.option("--workers", type=click.IntRange(min=1), help="stop waiting once N workers answered")
def control(
    topology: Path,
    command: str,
    model: str | None,
    version: str | None,
    weights: tuple[str, ...],
    wait: float,
    workers: int | None,
) -> None:
    """Send a control command to TOPOLOGY's workers and print each worker's answer."""
    from stream_infer.controller import Controller, new_command

    topo = _load(topology)
    fields: dict[str, Any] = {}
    if command != "status":
        if not model:
            raise click.UsageError(f"{command} needs --model")
        fields["model"] = model
    if command in {"swap", "shadow", "reset_learner"}:
        if command != "shadow" and not version:
            raise click.UsageError(f"{command} needs --version")
        fields["version"] = version
    if command == "split":
        if not weights:
            raise click.UsageError("split needs --weight VERSION=WEIGHT (repeated)")
        parsed = {}
        for item in weights:
            name, sep, value = item.partition("=")
            try:
                parsed[name] = float(value)
            except ValueError:
                sep = ""
            if sep and not math.isfinite(parsed[name]):
                sep = ""
            if not sep or not name:
                raise click.UsageError(f"--weight {item!r}: expected VERSION=WEIGHT, e.g. v2=0.1")
        fields["weights"] = parsed
    ctl = Controller(topo)
    try:
        sent = ctl.send(new_command(command, **fields))
        click.echo(f"sent {orjson.dumps(sent).decode()}")
        acks = ctl.acks(sent["id"], wait_s=wait, workers=workers)
    finally:
        ctl.close()
    for ack in acks:
        click.echo(orjson.dumps(ack).decode())
    if not acks:
        click.echo(f"no worker answered within {wait:g}s", err=True)
        sys.exit(1)
    if any(a["status"] != "applied" for a in acks):
        sys.exit(1)


@cli.command("build-example-models")
@click.option(
    "--out",
    default="models/phishing",
    show_default=True,
    type=click.Path(path_type=Path, file_okay=False),
)
def build_example_models(out: Path) -> None:
    """Train the phishing example's two model versions (seeded) and write them to OUT."""
    from stream_infer.examples import phishing

    for version, meta in phishing.build(out).items():
        click.echo(f"{version}: {meta.format} {meta.sha256[:12]} {meta.description}")


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="stream-infer", standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except (BrokerError, ModelError, StreamInferError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
