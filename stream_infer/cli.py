"""The one command line: ``stream-infer broker | worker | produce | tail | demo | ...``.

Errors a user can fix (an invalid topology, an unreachable broker, a bad argument) print one
clear message, no traceback: exit code 2 for invalid input (a topology that does not match its
artifacts, a web port in use), 1 for a broker that cannot be reached or a command that did not
get the answers it asked for, 130 for Ctrl-C.
"""

from __future__ import annotations

import errno
import logging
import math
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import orjson

from stream_infer.errors import BrokerError, ConfigError, ModelError, StreamInferError

F = TypeVar("F", bound=Callable[..., Any])
LOG_LEVELS = ("debug", "info", "warning", "error")
OVERRIDES_HELP = (
    "Every topology field can be overridden from the environment: "
    "STREAM_INFER_<SECTION>__<FIELD> (e.g. STREAM_INFER_KAFKA__BOOTSTRAP_SERVERS=broker:9092, "
    "STREAM_INFER_WORKER__WEB_PORT=6067) or STREAM_INFER_<FIELD> for a top-level one "
    "(STREAM_INFER_DEVICE=cpu)."
)


def _set_log_level(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is None:
        return
    from stream_infer.observability import configure_logging

    root = ctx.find_root()
    root.ensure_object(dict)["log_level"] = value
    configure_logging(value)


# --log-level is accepted before and after the subcommand (the last one given wins).
LOG_LEVEL = click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS),
    expose_value=False,
    is_eager=True,
    callback=_set_log_level,
    help="default: info",
)
_TOPOLOGY_ARG = click.argument(
    "topology", type=click.Path(path_type=Path, dir_okay=False), metavar="TOPOLOGY"
)


def TOPOLOGY(f: F) -> F:
    return LOG_LEVEL(_TOPOLOGY_ARG(f))


def _load(path: Path, *, check: bool = False) -> Any:
    """The topology; with ``check``, also checked against its artifacts (exit code 2)."""
    from stream_infer.settings import load_topology

    topo = load_topology(path)
    if check:
        from stream_infer.validation import check_topology, file_problems

        check_topology(topo, source=str(path), files=False)
        for problem in file_problems(topo):  # handled at run time: not-ready while routed
            logging.getLogger("stream_infer").warning("%s: %s", path, problem)
    return topo


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=OVERRIDES_HELP)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(LOG_LEVELS),
    help="also accepted after the subcommand",
)
@click.version_option(
    package_name="stream-infer", prog_name="stream-infer", message="%(prog)s %(version)s"
)
@click.pass_context
def cli(ctx: click.Context, log_level: str) -> None:
    """Streaming inference for Kafka: micro-batched torch models behind a control topic.

    Exit codes: 0 done; 1 Kafka unreachable, a delivery failed, or fewer answers than asked
    for; 2 invalid input (topology, artifacts, argument, web port in use); 130 Ctrl-C.
    """
    from stream_infer.observability import configure_logging

    ctx.ensure_object(dict).setdefault("log_level", log_level)
    configure_logging(ctx.obj["log_level"])


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


@cli.command(epilog=OVERRIDES_HELP)
@TOPOLOGY
@click.pass_context
def worker(ctx: click.Context, topology: Path) -> None:
    """Run one worker of TOPOLOGY in the foreground (SIGINT/SIGTERM stop it cleanly).

    Before anything connects, TOPOLOGY is checked as `validate` does (a missing or corrupt
    artifact is only a warning: the worker stays not-ready while the control log routes that
    version, and retries), and the web port
    (worker.web_port: /metrics, /healthz, /readyz) must be free: exit code 2 otherwise. It
    creates the topology's topics that do not exist, as `topics` does. Its state goes under
    worker.state_dir. Once it serves (ready), it prints one line with its metrics and health
    URLs.
    """
    from stream_infer.io.clients import check_reachable, ensure_topology_topics
    from stream_infer.runtime.app import run_worker

    topo = _load(topology, check=True)
    _check_port_free(topo.worker.web_host, topo.worker.web_port)
    check_reachable(topo.kafka)
    # Topics it cannot run on (a control topic that loses commands) are refused here, before
    # anything starts: exit code 2. Input and labels partitioned differently are an ERROR line
    # and a /healthz warning, as when a running worker sees them: not an exit (a scale-out of
    # the input topic alone would otherwise make every restarted worker exit).
    ensure_topology_topics(topo)
    base = f"http://{topo.worker.web_host}:{topo.worker.web_port}"
    threading.Thread(
        target=announce_when_ready, args=(base,), name="ready-announcer", daemon=True
    ).start()
    sys.exit(run_worker(topo, loglevel=ctx.obj["log_level"]))


def _check_port_free(host: str, port: int) -> None:
    """Refuse a web port another process listens on (another local worker), before faust
    starts and fails on it with a traceback."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # As aiohttp binds: a port left in TIME_WAIT is free, one that is listened on is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise ConfigError(f"worker.web_host {host}:{port}: {exc.strerror}") from None
            msg = (
                f"worker.web_port {port} on {host} is in use (another worker?): set "
                "STREAM_INFER_WORKER__WEB_PORT to a free port"
            )
            raise ConfigError(msg) from None


def announce_when_ready(
    base_url: str,
    *,
    interval_s: float = 0.5,
    echo: Callable[[str], None] = click.echo,
    stop: threading.Event | None = None,
) -> bool:
    """Poll ``/readyz`` until it answers 200, then print one line with the worker's URLs.

    faust's own "Ready" comes before the routing is replayed and the models are loaded; this
    line comes when the worker serves. Returns whether it printed (False once ``stop`` is set).
    """
    import urllib.error
    import urllib.request

    while stop is None or not stop.is_set():
        try:
            # An http:// URL built from worker.web_host and web_port, never a user's.
            with urllib.request.urlopen(f"{base_url}/readyz", timeout=2) as answer:  # noqa: S310
                if answer.status == 200:
                    echo(
                        f"ready: serving; metrics {base_url}/metrics, health {base_url}/healthz, "
                        f"readiness {base_url}/readyz"
                    )
                    return True
        except urllib.error.HTTPError as exc:
            exc.close()  # 503: not ready yet
        except OSError:
            pass  # not listening yet
        if stop is not None:
            stop.wait(interval_s)
        else:
            time.sleep(interval_s)
    return False


@cli.command()
@TOPOLOGY
def topics(topology: Path) -> None:
    """Create TOPOLOGY's topics (with their partition counts) if they do not exist, and check
    the existing ones: a control topic that would lose commands (more than one partition, finite
    retention) and input and labels topics partitioned differently are refused (exit code 2).
    TOPOLOGY is checked first, as `validate` does (a missing or corrupt artifact is only a
    warning here)."""
    from stream_infer.io.clients import ensure_topology_topics

    topo = _load(topology, check=True)
    created = ensure_topology_topics(topo, refuse_copartition=True)
    click.echo(f"created {created}" if created else "all topics exist")


@cli.command(epilog=OVERRIDES_HELP)
@TOPOLOGY
@click.option("--no-load", is_flag=True, help="skip loading each artifact into torch (faster)")
def validate(topology: Path, no_load: bool) -> None:
    """Check TOPOLOGY offline, without Kafka: the schema (with the environment overrides),
    each model version's meta.json, artifact and sha256, the features against the ones each
    artifact was trained on, the online policies against the learners and monitors, and that
    each artifact loads. Prints "TOPOLOGY: valid", or one message naming what differs (exit
    code 2). `worker` and `topics` run the same checks (except the loading) first."""
    from stream_infer.settings import load_topology
    from stream_infer.validation import check_topology

    topo = load_topology(topology)
    check_topology(topo, source=str(topology), load=not no_load)
    versions = sum(len(m.versions) for m in topo.models)
    click.echo(f"{topology}: valid")
    click.echo(
        f"  {len(topo.models)} model(s), {versions} version(s), {len(topo.features)} features, "
        f"{len(topo.online.learners)} learner(s), {len(topo.online.policies)} policy(ies)"
    )


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

    topo = _load(topology)
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
@click.option(
    "--id",
    "command_id",
    metavar="CMD_ID",
    help="with --what acks: the answers to this command only, read from the beginning; exits "
    "once --workers answered or after --wait",
)
@click.option(
    "--workers", type=click.IntRange(min=1), help="with --id: the answers expected (one each)"
)
@click.option(
    "--wait",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="with --id: seconds to wait for the answers",
)
def tail(
    topology: Path,
    what: str,
    from_beginning: bool,
    count: int | None,
    command_id: str | None,
    workers: int | None,
    wait: float,
) -> None:
    """Print records of one of TOPOLOGY's output topics as JSON lines, until Ctrl-C or --count.

    With --what acks --id CMD_ID: that command's answers, then exit (1 if fewer than --workers
    answered within --wait, naming who did)."""
    from confluent_kafka import Consumer

    from stream_infer.io.clients import check_reachable, consume_ready
    from stream_infer.io.watch import assign_all

    if command_id is not None and what != "acks":
        raise click.UsageError("--id needs --what acks")
    if command_id is None and workers is not None:
        raise click.UsageError("--workers needs --what acks --id CMD_ID")
    topo = _load(topology)
    if what == "drift" and not topo.online.monitors:
        why = (
            f"{topology} declares no online monitors: nothing writes drift events to "
            f"{topo.topics.drift or '(no drift topic)'}"
        )
        raise ConfigError(why)
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

    def missing(names: list[str]) -> None:
        which = f"topic {names[0]} does not" if len(names) == 1 else f"topics {names} do not"
        click.echo(f"{which} exist yet; waiting for it (Ctrl-C stops)", err=True)

    if command_id is not None:
        _tail_acks(consumer, topic_names, command_id, workers, wait, missing)
        return
    try:
        assign_all(
            consumer, topic_names, from_beginning=from_beginning, timeout_s=None, on_missing=missing
        )
    except KeyboardInterrupt:
        consumer.close()
        return
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


def _tail_acks(
    consumer: Any,
    topic_names: list[str],
    command_id: str,
    workers: int | None,
    wait: float,
    missing: Callable[[list[str]], None],
) -> None:
    """``tail --what acks --id``: one command's answers from the beginning, then exit."""
    from stream_infer.io.watch import assign_all, collect_acks

    try:
        assign_all(consumer, topic_names, from_beginning=True, timeout_s=wait, on_missing=missing)
        acks = collect_acks(
            consumer,
            command_id,
            wait_s=wait,
            workers=workers,
            on_ack=lambda ack: click.echo(orjson.dumps(ack).decode()),
        )
    finally:
        consumer.close()
    _exit_unless_all_answered(acks, command_id, workers, wait)
    if not acks:
        click.echo(f"no answer to {command_id} within {wait:g}s", err=True)
        sys.exit(1)


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
@LOG_LEVEL
def demo(
    topology_path: Path | None,
    rate: float,
    duration: float | None,
    bad_fraction: float,
    drift_at: float,
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
    """Send a control command to TOPOLOGY's workers and print each worker's answer.

    stdout carries only the answers, one JSON object a line (pipe it to jq); what was sent
    goes to stderr. `shadow` needs --version; `unshadow` stops a shadow."""
    from stream_infer.io.clients import check_reachable
    from stream_infer.io.controller import Controller, new_command

    topo = _load(topology)
    fields: dict[str, Any] = {}
    if command != "status":
        if not model:
            raise click.UsageError(f"{command} needs --model")
        fields["model"] = model
    if command in {"swap", "shadow", "reset_learner"}:
        if not version:
            hint = " (stopping a shadow is `unshadow`)" if command == "shadow" else ""
            raise click.UsageError(f"{command} needs --version{hint}")
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
    check_reachable(topo.kafka)
    ctl = Controller(topo)
    try:
        sent = ctl.send(new_command(command, **fields))
        click.echo(f"sent {orjson.dumps(sent).decode()}", err=True)
        acks = ctl.acks(sent["id"], wait_s=wait, workers=workers)
    finally:
        ctl.close()
    for ack in acks:
        click.echo(orjson.dumps(ack).decode())
    if not acks:
        click.echo(f"no worker answered within {wait:g}s", err=True)
        sys.exit(1)
    _exit_unless_all_answered(acks, sent["id"], workers, wait)
    if any(a["status"] != "applied" for a in acks):
        sys.exit(1)


def _exit_unless_all_answered(
    acks: list[dict[str, Any]], command_id: str | None, workers: int | None, wait_s: float
) -> None:
    """Exit 1, naming who answered, when fewer than ``workers`` workers answered: a rollout
    script must not go on as if every worker had."""
    answered = sorted({str(a.get("worker")) for a in acks})
    if workers is not None and len(answered) < workers:
        click.echo(
            f"{len(answered)} of {workers} workers answered {command_id} within {wait_s:g}s: "
            f"{', '.join(answered) or 'none'}; {workers - len(answered)} did not",
            err=True,
        )
        sys.exit(1)


@cli.command("build-example-models")
@click.option(
    "--out",
    default="models/phishing",
    show_default=True,
    type=click.Path(path_type=Path, file_okay=False),
)
@LOG_LEVEL
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
