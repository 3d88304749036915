"""Commands an operator runs against live workers: ``control``, ``rollout`` and ``tail``."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import orjson

from stream_infer.cli.common import TOPOLOGY, exit_unless_all_answered, load
from stream_infer.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])


def _ack_options(fn: F) -> F:
    """``--wait`` and ``--workers``: how long a command waits for the workers' acks."""
    fn = click.option(
        "--workers", type=click.IntRange(min=1), help="stop waiting once N workers answered"
    )(fn)
    return click.option(
        "--wait",
        default=5.0,
        show_default=True,
        type=click.FloatRange(min=0),
        help="seconds to wait for the workers' acks",
    )(fn)


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
@_ack_options
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


def _seconds(text: str) -> float:
    """``90``, ``90s``, ``10m``, ``2h`` -> seconds; click.BadParameter otherwise."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        value = float(number) * units[unit]
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        msg = f"{text!r}: expected a duration such as 90, 90s, 10m or 2h"
        raise click.BadParameter(msg, param_hint="--max-duration")
    return value


@click.command()
@TOPOLOGY
@click.option("--model", required=True, help="the model to roll out a version of")
@click.option("--candidate", help="the version to roll out (the one serving is the incumbent)")
@click.option(
    "--steps",
    default="0,0.05,0.25,0.5,1",
    show_default=True,
    help="the candidate's weight at each step, increasing, in [0, 1] (0: shadow)",
)
@click.option(
    "--metric",
    type=click.Choice(["log_loss", "accuracy", "roc_auc"]),
    default="log_loss",
    show_default=True,
)
@click.option(
    "--margin",
    type=float,
    default=0.0,
    show_default=True,
    help="how much worse (in the metric's loss units) the candidate may be and still pass",
)
@click.option("--confidence", type=float, default=0.95, show_default=True)
@click.option(
    "--min-labels",
    type=int,
    default=500,
    show_default=True,
    help="labels each version needs at each step (as joined by the driving worker)",
)
@click.option("--max-duration", default="1h", show_default=True, help="per step: 90s, 10m, 2h, ...")
@click.option(
    "--on-timeout",
    type=click.Choice(["hold", "abort"]),
    default="hold",
    show_default=True,
    help="what a step that runs out of time without a verdict does",
)
@click.option("--resume", is_flag=True, help="resume the model's held rollout instead")
@_ack_options
def rollout(
    topology: Path,
    model: str,
    candidate: str | None,
    steps: str,
    metric: str,
    margin: float,
    confidence: float,
    min_labels: int,
    max_duration: str,
    on_timeout: str,
    resume: bool,
    wait: float,
    workers: int | None,
) -> None:
    """Roll --candidate out on evidence: each step's weight is reached only when the joined
    labels show, with --confidence, that the candidate is not worse than the incumbent by more
    than --margin; worse, it is aborted back to the incumbent; past the last step it is
    swapped in.

    Sends one `rollout` command and prints each worker's answer (one JSON object a line);
    the steps that follow are split/swap commands the driving worker writes to the control
    log (`stream-infer control TOPOLOGY status` shows where it is). With --resume, a held
    rollout's step starts its clock again."""
    from stream_infer.core.control import rollout_plan
    from stream_infer.errors import ControlError
    from stream_infer.io.clients import check_reachable
    from stream_infer.io.controller import Controller, new_command

    topo = load(topology)
    if resume:
        fields: dict[str, Any] = {"model": model, "action": "resume"}
    else:
        if not candidate:
            raise click.UsageError("rollout needs --candidate (or --resume)")
        try:
            weights = [float(w) for w in steps.split(",") if w.strip()]
        except ValueError:
            msg = f"--steps {steps!r}: expected weights such as 0,0.05,0.25,0.5,1"
            raise click.UsageError(msg) from None
        plan = {
            "steps": weights,
            "metric": metric,
            "margin": margin,
            "confidence": confidence,
            "min_labels": min_labels,
            "max_duration_s": _seconds(max_duration),
            "on_timeout": on_timeout,
        }
        try:
            rollout_plan(plan)
        except ControlError as exc:
            raise click.UsageError(exc.detail) from None
        if not topo.topics.labels or not topo.online.enabled:
            why = (
                f"{topology}: a rollout is gated on joined labels: the topology needs "
                "topics.labels and online learning on (online.rollouts: true, a learner or a "
                "monitor)"
            )
            raise ConfigError(why)
        if weights and weights[0] == 0.0 and not topo.topics.shadow:
            why = (
                f"{topology}: the first step (weight 0) shadows the candidate, and shadows are "
                "scored only with topics.shadow: the step would never gather a label; "
                "declare topics.shadow, or start the steps above 0"
            )
            raise ConfigError(why)
        fields = {"model": model, "version": candidate, "plan": plan}
    check_reachable(topo.kafka)
    ctl = Controller(topo)
    try:
        sent = ctl.send(new_command("rollout", **fields))
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
