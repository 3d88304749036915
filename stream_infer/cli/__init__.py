"""The one command line: ``stream-infer broker | worker | produce | tail | demo | ...``.

Errors a user can fix (an invalid topology, an unreachable broker, a bad argument) print one
clear message, no traceback: exit code 2 for invalid input (a topology that does not match its
artifacts, a web port in use), 1 for a broker that cannot be reached or a command that did not
get the answers it asked for, 130 for Ctrl-C.

    common.py    the shared options (--log-level, TOPOLOGY), topology loading, the answers rule
    serve.py     worker, topics, validate
    operate.py   control, rollout, tail
    local.py     broker, demo, produce, build-example-models
    backtest.py  backtest

Subcommands import what they need when they run, so ``stream-infer --help`` loads no torch.
"""

from __future__ import annotations

import sys

import click

from stream_infer.cli import backtest, local, operate, serve
from stream_infer.cli.common import LOG_LEVELS, OVERRIDES_HELP
from stream_infer.errors import BrokerError, ConfigError, ModelError, StreamInferError


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


for command in (
    local.broker,
    serve.worker,
    serve.topics,
    serve.validate,
    local.produce,
    operate.tail,
    local.demo,
    operate.control,
    operate.rollout,
    local.build_example_models,
    backtest.backtest,
):
    cli.add_command(command)


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
