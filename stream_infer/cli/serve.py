"""Commands that run or prepare a worker: ``worker``, ``topics``, ``validate``."""

from __future__ import annotations

import errno
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from stream_infer.cli.common import OVERRIDES_HELP, TOPOLOGY, load
from stream_infer.errors import ConfigError

if TYPE_CHECKING:
    from stream_infer.settings import Topology


@click.command(epilog=OVERRIDES_HELP)
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

    topo = load(topology, check=True)
    _check_port_free(topo.worker.web_host, topo.worker.web_port)
    check_reachable(topo.kafka)
    # Topics it cannot run on (a control topic that loses commands) are refused here, before
    # anything starts: exit code 2. Input and labels partitioned differently are an ERROR line
    # and a /healthz warning, as when a running worker sees them: not an exit (a scale-out of
    # the input topic alone would otherwise make every restarted worker exit).
    ensure_topology_topics(topo)
    if topo.processing.exactly_once:
        _check_transactions(topo)
    base = f"http://{topo.worker.web_host}:{topo.worker.web_port}"
    threading.Thread(
        target=announce_when_ready, args=(base,), name="ready-announcer", daemon=True
    ).start()
    sys.exit(run_worker(topo, loglevel=ctx.obj["log_level"]))


def _check_transactions(topo: Topology) -> None:
    """exactly_once needs transactions that work: refused (exit code 2) on a broker whose
    read_committed readers see aborted records (the embedded tansu broker) or that has none."""
    from stream_infer.io.clients import consumer_config, transactional_producer_config
    from stream_infer.io.transactions import transactions_problem

    probe_id = topo.transactional_id(f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    probe_id += ".probe"
    problem = transactions_problem(
        transactional_producer_config(topo.kafka, probe_id),
        consumer_config(topo.kafka, "unused"),
        topo.transaction_probe_topic,
        timeout_s=max(topo.kafka.connect_timeout_s, topo.kafka.transaction_timeout_ms / 1000.0),
    )
    if problem is not None:
        msg = (
            f"processing.guarantee exactly_once needs a broker whose transactions work (Apache "
            f"Kafka >= 2.5); the cluster at {topo.kafka.bootstrap_servers} failed the check: "
            f"{problem}. Use processing.guarantee at_least_once on this broker"
        )
        raise ConfigError(msg)


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


@click.command()
@TOPOLOGY
def topics(topology: Path) -> None:
    """Create TOPOLOGY's topics (with their partition counts) if they do not exist, and check
    the existing ones: a control topic that would lose commands (more than one partition, finite
    retention) and input and labels topics partitioned differently are refused (exit code 2).
    TOPOLOGY is checked first, as `validate` does (a missing or corrupt artifact is only a
    warning here)."""
    from stream_infer.io.clients import ensure_topology_topics

    topo = load(topology, check=True)
    created = ensure_topology_topics(topo, refuse_copartition=True)
    click.echo(f"created {created}" if created else "all topics exist")


@click.command(epilog=OVERRIDES_HELP)
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
