"""``python -m bench``: the whole benchmark in one command (see bench/README.md).

    python -m bench                    # full run, ~15-20 min on 2 cores
    python -m bench --quick            # every part, tiny, in ~3 min (a smoke test)
    python -m bench --only ceiling,stream-infer

Parts: floor (the harness alone: load generator -> broker -> reader), ceiling, naive,
stream-infer (default settings), sweep (batch size x max wait, then stream-infer with the best
settings), scale (1 vs 2 workers in one group). Results go to
bench/results/ (bench/results/quick/ for --quick): results.json, RESULTS.md and
latency_vs_throughput.png; logs of every process to bench/results/raw/<run>/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import time
import traceback
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
        "--only",
        default=",".join(PARTS),
        help=f"comma-separated parts to run, of {','.join(PARTS)} (default: all)",
    )
    p.add_argument("--out", type=Path, help="results directory (default bench/results[/quick])")
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
    from bench import report
    from bench.runner import say

    plan = _plan(args)
    out_dir: Path = args.out or (RESULTS / "quick" if plan.quick else RESULTS)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    raw_dir = RESULTS / "raw" / stamp
    raw_dir.mkdir(parents=True, exist_ok=True)
    _prune_raw(RESULTS / "raw")
    previous = out_dir / "results.json"
    partial = set(parts) != set(PARTS)
    results: dict[str, Any] = (
        json.loads(previous.read_text())
        if partial and not args.fresh and previous.is_file()
        else {"floor": None, "systems": {}, "sweep": None, "scale": None, "runs": []}
    )
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
    code = 0
    try:
        _run_parts(plan, parts, raw_dir, results, run_info)
    except KeyboardInterrupt:
        say("interrupted: stopping everything")
        run_info["interrupted"] = True
        code = 130
    finally:
        run_info["duration_s"] = round(time.time() - started, 1)
        results["machine"] = report.machine_info()
        results["runs"] = [*results.get("runs", []), run_info][-10:]
        written = report.write_all(results, out_dir)
        say(f"bench: done in {run_info['duration_s']:.0f}s; wrote {', '.join(map(str, written))}")
    if run_info["errors"] and not code:
        code = 1
    return code


def _run_parts(
    plan: Plan, parts: list[str], raw_dir: Path, results: dict[str, Any], run_info: dict[str, Any]
) -> None:
    from bench import procs, runner
    from stream_infer.broker import EmbeddedBroker

    supervisor = procs.Supervisor(raw_dir)
    try:
        with EmbeddedBroker(log_path=raw_dir / "broker.log") as broker:
            ctx = runner.BenchContext(
                bootstrap_servers=broker.bootstrap_servers,
                broker_pid=broker.pid,
                supervisor=supervisor,
                plan=plan,
                work_dir=raw_dir,
            )
            runner.say(f"embedded broker (tansu) on {broker.bootstrap_servers}")
            steps = _steps(ctx, plan, parts, results)
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
    ctx: Any, plan: Plan, parts: list[str], results: dict[str, Any]
) -> list[tuple[str, Any]]:
    from bench import runner, systems

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
    if "sweep" in parts:
        steps.append(("sweep", sweep))
    if "scale" in parts:
        steps.append(("scale", scale))
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
