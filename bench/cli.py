"""``python -m bench``: the whole benchmark in one command (see bench/README.md).

    python -m bench                    # full run, ~26 min on 2 cores (2026-12-01: 1,572 s)
    python -m bench --quick            # every part, tiny, in ~3 min (a smoke test)
    python -m bench --only ceiling,stream-infer
    python -m bench --broker tansu     # on the embedded broker (results in bench/results/tansu)

The broker is one Apache Kafka node (KRaft, started here with plain java, data in a temporary
folder) where Java 17+ and Maven (or the cached jars) are present, else the embedded tansu.

Parts: floor (the harness alone: load generator -> broker -> reader), ceiling, naive,
stream-infer (default settings), exactly-once (stream-infer, default batching,
processing.guarantee exactly_once; Apache Kafka only, skipped on tansu), sweep (batch size x
max wait, then stream-infer with the best settings), scale (1 vs 2 workers in one group),
peers (Quix Streams and Bytewax measured like the others, then alternated rounds of
saturation runs: ceiling, stream-infer, Quix, Bytewax, on the small and the heavy model).
models (each workload's model: a forward pass at batch 1 and 256; no broker), features
(ceiling and stream-infer saturated on 9, 64 and 256 features, and on 9 padded to 7.5 KB).
Results go to
bench/results/ (bench/results/quick/ for --quick; a tansu run in tansu/ below that):
results.json, RESULTS.md and latency_vs_throughput.png; logs of every process, the broker's
included, to bench/results/raw/<run>/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from bench.plan import FULL, PARTS, QUICK, Plan

RESULTS = Path(__file__).resolve().parent / "results"
KEEP_RAW_RUNS = 5


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="everything tiny: a smoke test")
    p.add_argument(
        "--broker",
        choices=("kafka", "tansu"),
        help="kafka: one local Apache Kafka node; tansu: the embedded broker "
        "(default: kafka where Java 17+ can run it, else tansu)",
    )
    p.add_argument(
        "--only",
        default=",".join(PARTS),
        help=f"comma-separated parts to run, of {','.join(PARTS)} (default: all)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="results directory (default bench/results[/quick], and tansu/ below it for tansu)",
    )
    p.add_argument("--events", type=int, help="saturation events for ceiling and stream-infer")
    p.add_argument("--naive-events", type=int, help="saturation events for the naive agent")
    p.add_argument("--duration", type=float, help="seconds per open-loop latency run")
    p.add_argument("--sweep-sizes", help="max_batch_size values, e.g. 64,256,1024")
    p.add_argument("--sweep-waits", help="max_wait_ms values, e.g. 2,10,50")
    p.add_argument("--sweep-rate", type=float, help="fixed rate of the sweep's latency runs")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="with --only: start a new results.json instead of updating the existing one",
    )
    return p.parse_args(argv)


def _plan(args: argparse.Namespace) -> Plan:
    base = QUICK if args.quick else FULL

    def numbers(text: str | None, kind: type[float] | type[int]) -> tuple[Any, ...] | None:
        return tuple(kind(x) for x in text.split(",") if x.strip()) if text else None

    return base.with_overrides(
        events_fast=args.events,
        events_naive=args.naive_events,
        latency_duration_s=args.duration,
        sweep_sizes=numbers(args.sweep_sizes, int),
        sweep_waits_ms=numbers(args.sweep_waits, float),
        sweep_rate=args.sweep_rate,
    )


def _on_sigterm(_sig: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _prune_raw(raw_root: Path) -> None:
    runs = sorted(p for p in raw_root.glob("*") if p.is_dir())
    for old in runs[:-KEEP_RAW_RUNS]:
        shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        print(f"unknown part(s) {unknown}; choose from {','.join(PARTS)}", file=sys.stderr)
        return 2
    try:
        import matplotlib  # noqa: F401
        import psutil  # type: ignore[import-untyped]  # noqa: F401
    except ImportError as exc:
        print(
            f"the bench needs its extras ({exc.name} is missing): "
            ".venv/bin/pip install -e '.[bench]'",
            file=sys.stderr,
        )
        return 2
    if "peers" in parts and (missing := _missing_peers()):
        print(
            f"the peers part needs {missing}: `python3 dev.py setup` installs them (Bytewax: "
            ".venv/bin/pip install -e '.[peers]'; Quix Streams, in its own folder: see "
            "bench/README.md), or leave out the part (--only without peers)",
            file=sys.stderr,
        )
        return 2
    from bench import report
    from bench.runner import say
    from stream_infer.errors import BrokerError

    plan = _plan(args)
    choice = choose_broker(args.broker)
    if choice is None:
        return 2
    base_dir: Path = args.out or (RESULTS / "quick" if plan.quick else RESULTS)
    # A tansu run keeps its own results: the baseline a Kafka run's RESULTS.md compares with.
    out_dir = base_dir / "tansu" if choice.engine == "tansu" else base_dir
    baseline_path = base_dir / "tansu" / "results.json" if choice.engine == "kafka" else None
    previous = out_dir / "results.json"
    partial = set(parts) != set(PARTS)
    results: dict[str, Any] = (
        json.loads(previous.read_text())
        if partial and not args.fresh and previous.is_file()
        else {"floor": None, "systems": {}, "sweep": None, "scale": None, "runs": []}
    )
    earlier = report.broker_engine(results)
    if results.get("machine") and earlier != choice.engine:
        print(
            f"{previous} holds results measured on {earlier}, this run would use "
            f"{choice.engine}: pass --fresh to start a new results.json there, or --broker "
            f"{earlier}",
            file=sys.stderr,
        )
        return 2
    stamp = time.strftime("%Y%m%d-%H%M%S")
    raw_dir = RESULTS / "raw" / stamp
    raw_dir.mkdir(parents=True, exist_ok=True)
    _prune_raw(RESULTS / "raw")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGHUP, _on_sigterm)
    sys.setswitchinterval(0.001)  # the reader shares the GIL with the load generator
    started = time.time()
    run_info: dict[str, Any] = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "parts": parts,
        "quick": plan.quick,
        "plan": report.plan_dict(plan),
        "raw_dir": str(raw_dir.relative_to(RESULTS.parent.parent)),
        "loadavg_at_start": list(os.getloadavg()),
        "errors": {},
    }
    say(f"bench: parts {','.join(parts)}{' (quick)' if plan.quick else ''}; logs in {raw_dir}")
    say(f"bench: broker {choice.engine}: {choice.why}")
    broker_info: dict[str, Any] = {"engine": choice.engine, "chosen_because": choice.why}
    run_info["broker"] = broker_info
    code = 0
    try:
        _run_parts(plan, parts, raw_dir, results, run_info, broker_info, out_dir)
    except KeyboardInterrupt:
        say("interrupted: stopping everything")
        run_info["interrupted"] = True
        code = 130
    except BrokerError as exc:
        say(f"the broker failed: {exc}")
        run_info["errors"]["broker"] = f"{type(exc).__name__}: {exc}"
        code = 1
    finally:
        run_info["duration_s"] = round(time.time() - started, 1)
        results["machine"] = report.machine_info() | {"broker": broker_info}
        results["runs"] = [*results.get("runs", []), run_info][-10:]
        baseline = _load_baseline(baseline_path)
        written = report.write_all(results, out_dir, baseline=baseline)
        say(f"bench: done in {run_info['duration_s']:.0f}s; wrote {', '.join(map(str, written))}")
    if run_info["errors"] and not code:
        code = 1
    return code


def _missing_peers() -> str | None:
    """What the peers part lacks, or None: Bytewax (the ``peers`` extra) in this venv, and
    Quix Streams in ``<venv>/peers-quix`` (bench/peer_quix.py says why it lives apart)."""
    import importlib.util

    # As bench/peer_quix.py's QUIX_TARGET; not imported: that module puts it on sys.path.
    quix_target = Path(sys.prefix) / "peers-quix"
    missing = []
    if importlib.util.find_spec("bytewax") is None:
        missing.append("Bytewax (bytewax[kafka]==0.21.1)")
    if not (quix_target / "quixstreams").is_dir():
        missing.append(f"Quix Streams (quixstreams==3.28.1 in {quix_target})")
    return " and ".join(missing) or None


@dataclass(frozen=True)
class BrokerChoice:
    engine: str  # kafka | tansu
    why: str


def choose_broker(wanted: str | None) -> BrokerChoice | None:
    """The broker of this run and one line saying why; None (and why, on stderr) when
    ``--broker kafka`` cannot run here."""
    from stream_infer.local.apache_kafka import kafka_version, missing_tools

    if wanted == "tansu":
        return BrokerChoice("tansu", "the embedded tansu broker, as asked (--broker tansu)")
    why_not = missing_tools()
    if why_not is None:
        return BrokerChoice("kafka", f"one Apache Kafka {kafka_version()} node, started here")
    if wanted == "kafka":
        print(f"--broker kafka: Apache Kafka cannot run here: {why_not}", file=sys.stderr)
        return None
    return BrokerChoice(
        "tansu", f"the embedded tansu broker, because Apache Kafka cannot run here: {why_not}"
    )


@dataclass(frozen=True)
class RunningBroker:
    bootstrap_servers: str
    pid: int | None


@contextlib.contextmanager
def running_broker(engine: str, raw_dir: Path, info: dict[str, Any]) -> Iterator[RunningBroker]:
    """Start the broker, fill ``info`` (name, version, ...), stop it at the end. Its log ends
    up in ``raw_dir/broker.log``; Kafka's data lives in a temporary folder, removed."""
    if engine == "tansu":
        from stream_infer.local.tansu import EmbeddedBroker, tansu_binary

        info |= {"name": "tansu", "version": _tansu_version(str(tansu_binary()))}
        with EmbeddedBroker(log_path=raw_dir / "broker.log") as tansu:
            yield RunningBroker(tansu.bootstrap_servers, tansu.pid)
        return
    from stream_infer.local.apache_kafka import KafkaCluster

    with tempfile.TemporaryDirectory(prefix="stream-infer-bench-kafka-") as tmp:
        # Kafka's default 3 s, not the launcher's 0 s: the scale part's workers, started
        # together, join one generation when their start-ups end within 3 s of each other (on
        # a loaded machine they may not: the assignments column of RESULTS.md shows it).
        delay = {"group.initial.rebalance.delay.ms": "3000"}
        cluster = KafkaCluster(1, workdir=Path(tmp), config=delay)
        info |= {"name": "Apache Kafka", "version": cluster.version, "nodes": 1}
        info |= {"heap_mb": cluster.heap_mb, "mode": "KRaft, combined broker and controller"}
        try:
            cluster.start()
            info["started_in_s"] = round(cluster.started_in_s or 0.0, 1)
            yield RunningBroker(cluster.bootstrap_servers, cluster.nodes[1].pid)
        finally:
            cluster.stop()  # before copying its log: the shutdown lines are in it
            for node in cluster.nodes.values():
                with contextlib.suppress(OSError):
                    shutil.copyfile(node.log_path, raw_dir / "broker.log")


def _tansu_version(binary: str) -> str | None:
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().removeprefix("tansu").strip() or None


def _load_baseline(path: Path | None) -> dict[str, Any] | None:
    if path is None or not path.is_file():
        return None
    try:
        loaded: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        print(f"the tansu baseline {path} is not readable ({exc}); no comparison", file=sys.stderr)
        return None
    return loaded | {"_path": str(path.relative_to(RESULTS.parent.parent))}


def _run_parts(
    plan: Plan,
    parts: list[str],
    raw_dir: Path,
    results: dict[str, Any],
    run_info: dict[str, Any],
    broker_info: dict[str, Any],
    out_dir: Path,
) -> None:
    from bench import procs, runner

    supervisor = procs.Supervisor(raw_dir)
    try:
        with running_broker(broker_info["engine"], raw_dir, broker_info) as broker:
            ctx = runner.BenchContext(
                bootstrap_servers=broker.bootstrap_servers,
                broker_pid=broker.pid,
                supervisor=supervisor,
                plan=plan,
                work_dir=raw_dir,
                results_dir=out_dir,
            )
            runner.say(
                f"{broker_info['name']} {broker_info.get('version') or ''} on "
                f"{broker.bootstrap_servers}"
            )
            try:
                runner.warm_up_broker(ctx)
            except Exception as exc:  # the parts may still run: say it, keep going
                runner.say(f"broker warm-up FAILED: {exc}")
                run_info["errors"]["warm-up"] = f"{type(exc).__name__}: {exc}"
            steps = _steps(ctx, plan, parts, results, engine=broker_info["engine"])
            try:
                for name, step in steps:
                    try:
                        step()
                    except KeyboardInterrupt:
                        raise
                    except Exception as exc:
                        runner.say(f"{name} FAILED: {exc}")
                        run_info["errors"][name] = f"{type(exc).__name__}: {exc}"
                        (raw_dir / f"{name}.error.txt").write_text(traceback.format_exc())
            finally:
                run_info["broker_rss_bytes_at_end"] = procs.rss_of(broker.pid)
    finally:
        supervisor.stop_all()


def _steps(
    ctx: Any, plan: Plan, parts: list[str], results: dict[str, Any], engine: str = "kafka"
) -> list[tuple[str, Any]]:
    from bench import report, runner, systems

    systems_out: dict[str, Any] = results.setdefault("systems", {})

    def system(spec: systems.SystemSpec, n: int) -> None:
        systems_out[spec.key] = runner.measure_system(ctx, spec, n) | {
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")
        }

    def sweep() -> None:
        default = systems_out.get("stream-infer-default", {}).get("saturation", {})
        if plan.sweep_rate:
            rate, source = plan.sweep_rate, "a fixed moderate rate"
        elif default:
            rate, source = 0.5 * default["throughput_eps"], "half of the default's saturation"
        else:
            rate, source = plan.sweep_rate_fallback, "fallback: the default was not measured"
        points = []
        for size in plan.sweep_sizes:
            for wait in plan.sweep_waits_ms:
                spec = systems.stream_infer_with(
                    size, wait, key=f"sweep-{size}-{wait:g}", label=f"{size}/{wait:g}ms"
                )
                try:
                    points.append(runner.measure_sweep_point(ctx, spec, plan.sweep_events, rate))
                except runner.SystemFailed as exc:
                    runner.say(f"sweep {size}/{wait:g}: FAILED {exc}")
                    points.append({"max_batch_size": size, "max_wait_ms": wait, "error": str(exc)})
        best = pick_best(points)
        results["sweep"] = {
            "rate_eps": rate,
            "rate_source": source,
            "events": plan.sweep_events,
            "points": points,
            "best": best,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if best is None:
            msg = "no sweep point completed"
            raise runner.SystemFailed(msg)
        runner.say(f"sweep: best {best['max_batch_size']} / {best['max_wait_ms']:g} ms")
        spec = systems.stream_infer_with(
            best["max_batch_size"],
            best["max_wait_ms"],
            key="stream-infer-best",
            label=f"stream-infer (best: {best['max_batch_size']}/{best['max_wait_ms']:g}ms)",
        )
        system(spec, plan.events_fast)

    def scale() -> None:
        best = (results.get("sweep") or {}).get("best")
        size = best["max_batch_size"] if best else None
        wait = best["max_wait_ms"] if best else None
        runs = []
        for workers in plan.scale_workers:
            if size is None or wait is None:
                spec = systems.SystemSpec(
                    f"scale-{workers}", f"{workers} worker(s)", "stream-infer", workers=workers
                )
            else:
                spec = systems.stream_infer_with(
                    size, wait, key=f"scale-{workers}", label=f"{workers}", workers=workers
                )
            runs.append(runner.measure_scale(ctx, spec, plan.scale_events))
        results["scale"] = {
            "settings": "best from the sweep" if best else "default",
            "max_batch_size": size,
            "max_wait_ms": wait,
            "events": plan.scale_events,
            "runs": runs,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def peers() -> None:
        from dataclasses import replace

        from bench import workloads

        # Issue 16: the peers measured like every system (saturation, latency at the
        # fractions, RSS) on the small model; then the alternated rounds on every model.
        for spec in (systems.QUIX, systems.BYTEWAX):
            quix = spec.kind == "quix"
            system(spec, plan.peers_events_quix if quix else plan.peers_events_fast)
        base = [systems.CEILING, systems.STREAM_INFER_DEFAULT, systems.QUIX, systems.BYTEWAX]
        out = results["peers"] = {
            "rounds": plan.peers_rounds,
            "order": [s.key for s in base],
            "workloads": {},
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        for wkey in plan.peers_workloads:
            workload = workloads.BY_KEY.get(wkey)
            if workload is None:
                runner.say(f"peers: no workload {wkey!r} in bench/workloads.py: skipped")
                continue
            heavy = wkey == "heavy"
            fast = plan.peers_heavy_events_fast if heavy else plan.peers_events_fast
            slow = plan.peers_heavy_events_quix if heavy else plan.peers_events_quix
            events = {s.key: slow if s.kind == "quix" else fast for s in base}
            entry: dict[str, Any] = {"events": events, "describe": workloads.describe(workload)}
            try:
                entry["cost"] = workloads.measure_cost_subprocess(workload)
            except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as exc:
                entry["cost_error"] = str(exc)
            specs = [replace(s, workload=workload) for s in base]
            rounds = runner.measure_rounds(ctx, specs, events, plan.peers_rounds)
            entry |= {"runs": rounds, "summary": report.summarize_rounds(rounds)}
            out["workloads"][wkey] = entry
        for row in report.peers_targets(results):
            runner.say(
                f"peers target ({row['workload']}) {row['target']}: {row['measured']} "
                f"{'met' if row['met'] else 'MISSED'}"
            )

    def floor() -> None:
        results["floor"] = runner.measure_floor(
            ctx, plan.floor_rates, plan.floor_duration_s, plan.floor_warmup_s
        ) | {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    steps: list[tuple[str, Any]] = []
    if "floor" in parts:
        steps.append(("floor", floor))
    if "ceiling" in parts:
        steps.append(("ceiling", lambda: system(systems.CEILING, plan.events_fast)))
    if "naive" in parts:
        steps.append(("naive", lambda: system(systems.NAIVE, plan.events_naive)))
    if "stream-infer" in parts:
        steps.append(
            ("stream-infer", lambda: system(systems.STREAM_INFER_DEFAULT, plan.events_fast))
        )
    if "exactly-once" in parts:
        if engine == "tansu":
            # The worker refuses exactly_once on tansu (it exits 2): no transactions there.
            runner.say("exactly-once: skipped on tansu (no Kafka transactions); use --broker kafka")
        else:
            spec = systems.STREAM_INFER_EXACTLY_ONCE
            steps.append(("exactly-once", lambda: system(spec, plan.events_fast)))
    if "sweep" in parts:
        steps.append(("sweep", sweep))
    if "scale" in parts:
        steps.append(("scale", scale))
    if "peers" in parts:
        steps.append(("peers", peers))
    if "models" in parts or "features" in parts:
        from bench import features

        if "models" in parts:
            steps.append(("models", lambda: results.update(workloads=features.measure_models())))
        if "features" in parts:
            steps.append(
                ("features", lambda: results.update(features=features.measure_features(ctx, plan)))
            )
    if "tail" in parts or "profile" in parts:
        from bench import profile

        if "tail" in parts:
            steps.append(("tail", lambda: results.update(tail=profile.measure_tail(ctx, plan))))
        if "profile" in parts:

            def profiled() -> None:
                out_dir = ctx.results_dir or ctx.work_dir
                out_dir.mkdir(parents=True, exist_ok=True)
                results["profile"] = profile.measure_profile(ctx, plan, out_dir)

            steps.append(("profile", profiled))
    return steps


def pick_best(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Highest saturation among the points whose p99 at the sweep rate is within
    max_wait + 25 ms (the issue's latency target); if none is, the highest saturation."""
    done = [p for p in points if "saturation" in p and "p99_ms" in p.get("latency", {})]
    if not done:
        return None
    within = [p for p in done if p["latency"]["p99_ms"] <= p["max_wait_ms"] + 25.0]
    pool = within or done
    best = max(pool, key=lambda p: p["saturation"]["throughput_eps"])
    return {
        "max_batch_size": best["max_batch_size"],
        "max_wait_ms": best["max_wait_ms"],
        "rule": "highest saturation with p99 <= max_wait + 25 ms at the sweep rate"
        if within
        else "highest saturation (no point met p99 <= max_wait + 25 ms)",
    }
