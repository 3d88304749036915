"""``stream-infer backtest``: a candidate version against the incumbent on replayed traffic.

It reads the input and labels topics again from a time on (Kafka's offsets-for-times), scores
every valid event with both versions, joins the labels, and reports both versions' prequential
metrics, their agreement and the distribution of their score differences
(:mod:`stream_infer.online.backtest`). It joins no consumer group and writes nothing to Kafka
(:mod:`stream_infer.io.replay`).
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from stream_infer.cli.common import TOPOLOGY, load
from stream_infer.errors import ConfigError

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
WINDOWS = 50  # event-time windows the series has by default


def parse_duration_s(text: str) -> float:
    """``2h``, ``90m``, ``1h30m``, ``45s``, ``1d`` in seconds; ValueError for anything else.

    >>> parse_duration_s("2h"), parse_duration_s("1h30m"), parse_duration_s("1.5d")
    (7200.0, 5400.0, 129600.0)
    """
    spec = text.strip().lower()
    matches = list(_DURATION_RE.finditer(spec))
    if not spec or "".join(m.group(0) for m in matches).replace(" ", "") != spec.replace(" ", ""):
        msg = f"{text!r} is not a duration (e.g. 2h, 90m, 1h30m, 45s, 1d)"
        raise ValueError(msg)
    total = sum(float(m.group(1)) * _UNIT_S[m.group(2)] for m in matches)
    if total <= 0:
        msg = f"{text!r}: a duration must be longer than 0"
        raise ValueError(msg)
    return total


def parse_timestamp_ms(text: str) -> int:
    """Epoch milliseconds (digits only) or an ISO 8601 time (no zone: UTC) in epoch ms.

    >>> parse_timestamp_ms("1700000000000"), parse_timestamp_ms("2023-11-14T22:13:20Z")
    (1700000000000, 1700000000000)
    >>> parse_timestamp_ms("2023-11-14T23:13:20+01:00")
    1700000000000
    """
    spec = text.strip()
    if spec.isdigit():
        return int(spec)
    try:
        when = datetime.fromisoformat(spec)
    except ValueError:
        msg = f"{text!r} is neither epoch milliseconds nor an ISO 8601 time"
        raise ValueError(msg) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return round(when.timestamp() * 1000)


def time_range_ms(
    since: str | None, from_timestamp: str | None, until: str | None, now_ms: int
) -> tuple[int, int | None]:
    """(start, end) in epoch ms from the options; ConfigError for a bad or missing one.

    >>> time_range_ms("2h", None, None, now_ms=10_000_000)
    (2800000, None)
    """
    if (since is None) == (from_timestamp is None):
        msg = "give exactly one of --since (e.g. 2h) and --from-timestamp (ISO 8601 or epoch ms)"
        raise ConfigError(msg)
    try:
        if since is not None:
            start = now_ms - round(parse_duration_s(since) * 1000)
        else:
            start = parse_timestamp_ms(from_timestamp or "")
        end = None if until is None else parse_timestamp_ms(until)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if end is not None and end <= start:
        msg = f"--until ({end} ms) must come after the start ({start} ms)"
        raise ConfigError(msg)
    return start, end


def _iso(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")


@click.command()
@TOPOLOGY
@click.option("--version", "candidate", required=True, help="the candidate version")
@click.option("--model", help="the model (default: the topology's only model)")
@click.option(
    "--incumbent", help="the version to compare with (default: the topology's serving version)"
)
@click.option("--since", help="replay from this long ago: 2h, 90m, 1h30m, 1d")
@click.option(
    "--from-timestamp", "from_timestamp", help="replay from this time: ISO 8601 or epoch ms"
)
@click.option(
    "--until",
    help="replay up to this time (ISO 8601 or epoch ms); default: what the topics hold at start",
)
@click.option(
    "--threshold",
    default=0.5,
    show_default=True,
    type=click.FloatRange(0.0, 1.0, max_open=True),
    help="decision threshold of the agreement rate (a version decides 1 when p > threshold)",
)
@click.option(
    "--window",
    "window",
    help="event-time window of the per-window metrics (e.g. 5m); default: a 50th of the range",
)
@click.option(
    "--max-pending",
    default=1_000_000,
    show_default=True,
    type=click.IntRange(min=1),
    help="events waiting for their label (and labels for their event) held at most",
)
@click.option("--batch-size", default=4096, show_default=True, type=click.IntRange(min=1))
@click.option("--device", help="cpu, cuda, cuda:N or auto (default: the topology's)")
@click.option(
    "--idle-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="seconds without a record before partitions short of their end are left",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="write the report as JSON to this file",
)
@click.option(
    "--plot",
    type=click.Path(path_type=Path, dir_okay=False),
    help="draw the per-window metrics of both versions to this PNG (needs matplotlib: "
    "pip install 'stream-infer[plot]')",
)
@click.option("--quiet", is_flag=True, help="no progress bar")
def backtest(
    topology: Path,
    candidate: str,
    model: str | None,
    incumbent: str | None,
    since: str | None,
    from_timestamp: str | None,
    until: str | None,
    threshold: float,
    window: str | None,
    max_pending: int,
    batch_size: int,
    device: str | None,
    idle_timeout: float,
    out: Path | None,
    plot: Path | None,
    quiet: bool,
) -> None:
    """Score a candidate version against the incumbent on TOPOLOGY's past traffic.

    Replays the input and labels topics from --since/--from-timestamp (Kafka's
    offsets-for-times) up to --until or what they hold now, scores every valid event with both
    versions, joins the labels by event id as the online learner does, and prints both
    versions' prequential metrics, their agreement and their score differences. Joins no
    consumer group and writes nothing to Kafka."""
    start_ms, until_ms = time_range_ms(since, from_timestamp, until, round(time.time() * 1000))
    topo = load(topology)
    spec = _model(topo, model)
    incumbent = incumbent or spec.serving
    for version in (candidate, incumbent):
        if spec.version(version) is None:
            names = [v.version for v in spec.versions]
            msg = f"model {spec.name!r} has no version {version!r}; declared: {names}"
            raise ConfigError(msg)
    if candidate == incumbent:
        msg = f"--version {candidate} is the incumbent: give another --version or --incumbent"
        raise ConfigError(msg)
    if topo.topics.labels is None:
        raise ConfigError("a backtest needs labels: the topology has no topics.labels")
    if plot is not None:
        _require_matplotlib()
    if window is None:
        span_ms = (until_ms or round(time.time() * 1000)) - start_ms
        window_s = float(max(1, round(span_ms / 1000 / WINDOWS)))
    else:
        try:
            window_s = parse_duration_s(window)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    report = run_backtest(
        topo,
        spec.name,
        candidate,
        incumbent,
        start_ms=start_ms,
        until_ms=until_ms,
        window_s=window_s,
        threshold=threshold,
        max_pending=max_pending,
        batch_size=batch_size,
        device=device or topo.device,
        idle_timeout_s=idle_timeout,
        progress=not quiet,
    )
    if out is not None:
        import orjson

        out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    if plot is not None:
        plot_report(report, plot)
    print_report(report)
    if out is not None:
        click.echo(f"report written to {out}")
    if plot is not None:
        click.echo(f"plot written to {plot}")


def _model(topo: Any, name: str | None) -> Any:
    if name is None:
        if len(topo.models) != 1:
            names = [m.name for m in topo.models]
            msg = f"the topology has {len(names)} models {names}: say which with --model"
            raise ConfigError(msg)
        return topo.models[0]
    for spec in topo.models:
        if spec.name == name:
            return spec
    msg = f"the topology has no model {name!r}; models: {[m.name for m in topo.models]}"
    raise ConfigError(msg)


def run_backtest(
    topo: Any,
    model: str,
    candidate: str,
    incumbent: str,
    *,
    start_ms: int,
    until_ms: int | None,
    window_s: float,
    threshold: float = 0.5,
    max_pending: int = 1_000_000,
    batch_size: int = 4096,
    device: str = "cpu",
    idle_timeout_s: float = 10.0,
    progress: bool = False,
) -> dict[str, Any]:
    """Replay, score and join; the report (:meth:`Backtest.report`) with the replay's range."""
    import numpy as np
    from rich.console import Console
    from rich.progress import Progress

    from stream_infer.core.serde import FeatureDecoder, decode_labels
    from stream_infer.inference.device import select_device
    from stream_infer.inference.predictor import TorchPredictor
    from stream_infer.io.clients import check_reachable
    from stream_infer.io.replay import Replay
    from stream_infer.online.backtest import Backtest

    check_reachable(topo.kafka)
    torch_device = select_device(device)
    spec = _model(topo, model)
    predictors = {}
    for version in (candidate, incumbent):
        meta, predictor = TorchPredictor.load(
            spec.version(version).path,
            model=model,
            version=version,
            features=topo.features,
            device=torch_device,
        )
        if meta.output not in ("probability", "logit"):
            msg = (
                f"{model}:{version} outputs {meta.output}: a backtest compares classifiers "
                "(probability or logit outputs)"
            )
            raise ConfigError(msg)
        predictors[version] = predictor
    decoder = FeatureDecoder(topo.features, topo.limits.max_event_bytes)
    bt = Backtest(
        model,
        candidate=candidate,
        incumbent=incumbent,
        start_s=start_ms / 1000,
        window_s=window_s,
        threshold=threshold,
        max_pending=max_pending,
        metrics_window=topo.online.metrics_window,
    )
    input_topic, labels_topic = topo.topics.input, topo.topics.labels
    started = time.monotonic()
    with Replay(
        topo.kafka,
        [input_topic, labels_topic],
        from_ms=start_ms,
        until_ms=until_ms,
        idle_timeout_s=idle_timeout_s,
    ) as replay:
        ranges = replay.open()
        # On stderr: stdout carries the report alone.
        with Progress(console=Console(stderr=True), disable=not progress, transient=True) as bar:
            task = bar.add_task("replaying", total=replay.total)
            for records in replay.batches(batch_size):
                events = [r for r in records if r.topic() == input_topic]
                labels = [r for r in records if r.topic() == labels_topic]
                if events:
                    batch, dead = decoder.decode_batch(events)
                    bt.invalid_many(d.reason for d in dead)
                    if len(batch):
                        ts_s = [events[i].timestamp()[1] / 1000 for i in batch.positions]
                        scores = {
                            v: np.asarray(p.predict_many(batch.x)).reshape(len(batch), -1)[:, 0]
                            for v, p in predictors.items()
                        }
                        bt.scored_many(
                            batch.ids, batch.x, ts_s, scores[candidate], scores[incumbent]
                        )
                if labels:
                    decoded, bad = decode_labels(labels)
                    bt.invalid_labels(len(bad))
                    bt.labels_many(decoded)
                bar.update(task, advance=len(records))
                bar.update(task, description=f"{bt.events} events, {bt.labels} labels")
        incomplete = replay.incomplete
    report = bt.report()
    by_topic: Counter[str] = Counter()
    for r in ranges:
        by_topic[r.topic] += r.size
    report["replay"] = {
        "topology": topo.name,
        "from_ms": start_ms,
        "from": _iso(start_ms),
        "until_ms": until_ms,
        "until": None if until_ms is None else _iso(until_ms),
        "offsets": dict(by_topic),
        "partitions": [
            {"topic": r.topic, "partition": r.partition, "start": r.start, "end": r.end}
            for r in ranges
        ],
        "incomplete": [f"{r.topic}[{r.partition}]" for r in incomplete],
        "took_s": round(time.monotonic() - started, 3),
        "device": str(torch_device),
    }
    return report


def print_report(report: dict[str, Any]) -> None:
    """The report as tables on stdout."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    cand, inc = report["candidate"], report["incumbent"]
    replay = report.get("replay", {})
    console.print(
        f"backtest of {report['model']}:{cand} against {inc}, "
        f"from {replay.get('from')} to {replay.get('until') or 'the end at start'}"
    )
    metrics = Table(title="prequential metrics on the joined labels")
    for column in ("metric", cand, inc, f"{cand} - {inc}"):
        metrics.add_column(column, justify="right")
    m = report["metrics"]
    for name in ("log_loss", "accuracy", "roc_auc", "rolling_log_loss", "rolling_accuracy"):
        diff = m[cand][name] - m[inc][name]
        metrics.add_row(name, f"{m[cand][name]:.4f}", f"{m[inc][name]:.4f}", f"{diff:+.4f}")
    metrics.add_row("labels scored", str(m[cand]["n"]), str(m[inc]["n"]), "")
    console.print(metrics)
    agreement, sd = report["agreement"], report["score_difference"]
    rate = agreement["rate"]
    console.print(
        f"agreement at p > {agreement['threshold']:g}: "
        + ("n/a (no event scored)" if rate is None else f"{rate:.4f} of {agreement['n']} events")
    )
    if sd["n"]:
        q = sd["quantiles"]
        console.print(
            f"score difference {cand} - {inc}: mean {sd['mean']:+.4f}, mean |d| "
            f"{sd['mean_abs']:.4f}; quantiles " + ", ".join(f"{k}: {v:+.4f}" for k, v in q.items())
        )
    c = report["counts"]
    console.print(
        f"events read {c['events']} (scored {c['scored_events']}, invalid {c['invalid_events']}"
        + (f": {c['invalid_by_reason']}" if c["invalid_by_reason"] else "")
        + f"), labels read {c['labels']} (invalid {c['invalid_labels']}, not 0/1 "
        f"{c['non_binary_labels']}), joined {c['joined']}, events without a label "
        f"{c['unlabeled_events']}, labels without their event {c['labels_without_event']}, "
        f"duplicate labels {c['duplicate_labels']}"
    )
    if c["evicted"]:
        console.print(
            f"[yellow]{c['evicted']} events or labels were evicted (--max-pending): "
            "raise it to join them[/yellow]"
        )
    if replay.get("incomplete"):
        console.print(
            f"[yellow]partitions left short of their end (no record for the idle timeout): "
            f"{', '.join(replay['incomplete'])}[/yellow]"
        )


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        msg = (
            "--plot needs matplotlib, which stream-infer does not install by default: "
            "pip install 'stream-infer[plot]' (or leave out --plot)"
        )
        raise ConfigError(msg) from None


def plot_report(report: dict[str, Any], path: Path) -> None:
    """Log loss and accuracy of both versions per event-time window, with the labels per
    window."""
    _require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cand, inc = report["candidate"], report["incumbent"]
    series = report["windows"]["series"]
    window_s = report["windows"]["window_s"]
    start_s = report.get("replay", {}).get("from_ms", 0) / 1000
    x = [(w["start_s"] + window_s / 2 - start_s) / 60 for w in series]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True, height_ratios=(3, 3, 1.4))
    for version, style in ((cand, "-"), (inc, "--")):
        for ax, name in zip(axes[:2], ("log_loss", "accuracy"), strict=True):
            y = [w[version][name] if w[version]["n"] else math.nan for w in series]
            total = report["metrics"][version][name]
            ax.plot(x, y, style, marker=".", label=f"{version} (overall {total:.3f})")
    axes[0].set_ylabel("log loss (lower is better)")
    axes[1].set_ylabel("accuracy")
    axes[2].bar(x, [w[cand]["n"] for w in series], width=window_s / 60 * 0.9, color="grey")
    axes[2].set_ylabel("labels")
    axes[2].set_xlabel(f"minutes since the start (windows of {window_s:g} s, by event time)")
    for ax in axes[:2]:
        ax.legend(loc="best")
        ax.grid(alpha=0.3)
    agreement = report["agreement"]["rate"]
    fig.suptitle(
        f"backtest {report['model']}: {cand} vs {inc}; agreement "
        + ("n/a" if agreement is None else f"{agreement:.3f}")
        + f", {report['counts']['joined']} labels joined"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
