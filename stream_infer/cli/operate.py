"""Commands an operator runs against live workers: ``control`` and ``tail``."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import orjson

from stream_infer.cli.common import TOPOLOGY, exit_unless_all_answered, load
from stream_infer.errors import ConfigError


@click.command()
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

    topo = load(topology)
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
    exit_unless_all_answered(acks, sent["id"], workers, wait)
    if any(a["status"] != "applied" for a in acks):
        sys.exit(1)


@click.command()
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
    answered within --wait, naming who did). It reads committed records only
    (isolation.level=read_committed): under processing.guarantee exactly_once, what an aborted
    transaction wrote is never printed."""
    from confluent_kafka import Consumer

    from stream_infer.io.clients import (
        check_reachable,
        consume_ready,
        groupless_consumer_config,
    )
    from stream_infer.io.watch import assign_all

    if command_id is not None and what != "acks":
        raise click.UsageError("--id needs --what acks")
    if command_id is None and workers is not None:
        raise click.UsageError("--workers needs --what acks --id CMD_ID")
    topo = load(topology)
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
    # Assigned, never subscribed: it joins no group and commits nothing; read_committed.
    consumer = Consumer(groupless_consumer_config(topo.kafka.librdkafka(), "tail"))

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
    exit_unless_all_answered(acks, command_id, workers, wait)
    if not acks:
        click.echo(f"no answer to {command_id} within {wait:g}s", err=True)
        sys.exit(1)
