"""What the subcommands share: the --log-level and TOPOLOGY options, loading a topology, and
the exit rule for commands that wait for the workers' answers."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

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


def load(path: Path, *, check: bool = False) -> Any:
    """The topology; with ``check``, also checked against its artifacts (exit code 2)."""
    from stream_infer.settings import load_topology

    topo = load_topology(path)
    if check:
        from stream_infer.validation import check_topology, file_problems

        check_topology(topo, source=str(path), files=False)
        for problem in file_problems(topo):  # handled at run time: not-ready while routed
            logging.getLogger("stream_infer").warning("%s: %s", path, problem)
    return topo


def exit_unless_all_answered(
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
