"""Issue 16, items 4 and 5: where the worker's CPU goes at saturation, and its tail at low load.

``profile``: stream-infer (default settings) at saturation on the small model; once it is
serving, py-spy samples it for ``profile_duration_s`` (every thread, 200 Hz, without pausing
it) and writes ``flamegraph.svg`` (py-spy's own, interactive in a browser) to the results
folder; over the same seconds each OS thread's CPU time is read from ``/proc/<pid>/task``,
named by py-spy's thread list (a thread py-spy does not list is native: librdkafka's are
named ``rdk:*``, anything else, an OpenMP worker say, is shown as ``native``).

``tail``: stream-infer (default settings) at ``tail_rate`` events/s for ``tail_duration_s``
(longer than the latency runs, so a stall every few seconds shows), ``tail_runs`` times, each
beside a harness-floor run at the same rate just before it; the target: the median p99 within
15 ms of the median floor p99.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench import runner, systems
from bench.plan import Plan

TAIL_MARGIN_MS = 15.0


def _py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.is_file() else shutil.which("py-spy")


def _thread_cpu(pid: int) -> dict[str, tuple[str, float]]:
    """tid -> (OS thread name, CPU seconds so far)."""
    out: dict[str, tuple[str, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[tid] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def _python_thread_names(spy: str, pid: int) -> dict[str, str]:
    """tid -> Python thread name, from ``py-spy dump``."""
    done = subprocess.run(
        [spy, "dump", "--pid", str(pid), "--nonblocking"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    names: dict[str, str] = {}
    for line in done.stdout.splitlines():
        # Thread 27968 (active+gil): "inference_0"
        if line.startswith("Thread ") and '"' in line:
            tid = line.split()[1]
            names[tid] = line.split('"')[1]
    return names


def measure_profile(ctx: runner.BenchContext, plan: Plan, out_dir: Path) -> dict[str, Any]:
    spy = _py_spy()
    if spy is None:
        msg = "py-spy is not installed: .venv/bin/pip install -e '.[bench]'"
        raise RuntimeError(msg)
    spec = systems.STREAM_INFER_DEFAULT
    found: dict[str, Any] = {}
    sampler: list[threading.Thread] = []
    with runner.SystemRun(ctx, spec) as run:
        plain_start = run.start

        def start_and_sample() -> None:
            plain_start()
            pid = run.procs[0].proc.pid

            def sample() -> None:
                time.sleep(plan.profile_delay_s)  # start-up: the model, the group join
                names = _python_thread_names(spy, pid)  # while it runs
                before = _thread_cpu(pid)
                t0 = time.monotonic()
                done = subprocess.run(
                    [
                        spy,
                        "record",
                        "--pid",
                        str(pid),
                        "--duration",
                        str(int(plan.profile_duration_s)),
                        "--rate",
                        "200",
                        "--nonblocking",
                        "--threads",
                        "--format",
                        "flamegraph",
                        "--output",
                        str(out_dir / "flamegraph.svg"),
                    ],
                    capture_output=True,
                    text=True,
                    timeout=plan.profile_duration_s + 60,
                    check=False,
                )
                after = _thread_cpu(pid)
                elapsed = time.monotonic() - t0
                found["py_spy"] = (done.stderr or done.stdout).strip().splitlines()[-2:]
                found["window_s"] = round(elapsed, 2)
                rows = []
                for tid, (os_name, cpu) in after.items():
                    used = cpu - before.get(tid, (os_name, 0.0))[1]
                    if used <= 0:
                        continue
                    name = names.get(tid) or (os_name if os_name.startswith("rdk:") else "native")
                    rows.append({"thread": name, "tid": tid, "cpu_s": round(used, 3)})
                rows.sort(key=lambda r: -r["cpu_s"])
                found["threads"] = rows

            sampler.append(threading.Thread(target=sample, daemon=True, name="bench-profile"))
            sampler[0].start()

        run.start = start_and_sample  # type: ignore[method-assign]
        sat = run.saturation(plan.profile_events)
        if sampler:  # the worker stays up until py-spy is done (idle, if it ran out of events)
            sampler[0].join(plan.profile_delay_s + plan.profile_duration_s + 90)
    found["saturation"] = {
        k: sat[k] for k in ("throughput_eps", "cpu_s_per_1k", "window_s") if k in sat
    }
    if (out_dir / "flamegraph.svg").is_file():
        found["flamegraph"] = "flamegraph.svg"
    runner.say(
        f"profile: {sat['throughput_eps']:,.0f} events/s, {sat['cpu_s_per_1k']:.3f} CPU s/1k; "
        + ", ".join(f"{r['thread']} {r['cpu_s']:.2f}s" for r in found.get("threads", [])[:6])
    )
    return found


def measure_tail(ctx: runner.BenchContext, plan: Plan) -> dict[str, Any]:
    runs = []
    for i in range(plan.tail_runs):
        floor = runner.measure_floor(
            ctx,
            (plan.tail_rate,),
            plan.floor_duration_s,
            plan.floor_warmup_s,
            first_seed=900 + i,
            announce=False,
        )["latency"][0]
        with runner.SystemRun(ctx, systems.STREAM_INFER_DEFAULT) as run:
            run.start_ready()
            point = run.latency(
                plan.tail_rate,
                duration_s=plan.tail_duration_s,
                warmup_s=plan.latency_warmup_s,
                seed=950 + i,
            )
        runs.append({"floor": _brief(floor), "stream_infer": _brief(point)})
        runner.say(
            f"tail {plan.tail_rate:,.0f} events/s run {i + 1}: stream-infer p99 "
            f"{point.get('p99_ms', float('nan')):.1f} ms, floor p99 "
            f"{floor.get('p99_ms', float('nan')):.1f} ms"
        )
    return {"rate_eps": plan.tail_rate, "duration_s": plan.tail_duration_s, "runs": runs} | (
        tail_summary(runs)
    )


def _brief(point: dict[str, Any]) -> dict[str, Any]:
    keys = ("offered_eps", "achieved_eps", "p50_ms", "p99_ms", "p999_ms", "max_ms", "complete")
    out = {k: point[k] for k in keys if k in point}
    if "stages" in point:
        out["stages"] = point["stages"]
    return out


def tail_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The medians and the target (median p99 within 15 ms of the median floor p99).

    >>> tail_summary([{"floor": {"p99_ms": 12.0}, "stream_infer": {"p99_ms": 25.0}}])
    {'floor_p99_ms': 12.0, 'p99_ms': 25.0, 'over_floor_ms': 13.0, 'met': True}
    """
    si = [r["stream_infer"]["p99_ms"] for r in runs if "p99_ms" in r["stream_infer"]]
    fl = [r["floor"]["p99_ms"] for r in runs if "p99_ms" in r["floor"]]
    if not si or not fl:
        return {}
    p99, floor = statistics.median(si), statistics.median(fl)
    return {
        "floor_p99_ms": round(floor, 1),
        "p99_ms": round(p99, 1),
        "over_floor_ms": round(p99 - floor, 1),
        "met": p99 - floor <= TAIL_MARGIN_MS,
    }


def markdown_lines(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    tail = results.get("tail")
    if tail and tail.get("runs"):
        lines += [
            f"## The tail at low load ({tail['rate_eps']:,.0f} events/s)",
            "",
            f"stream-infer (default settings) at {tail['rate_eps']:,.0f} events/s for "
            f"{tail['duration_s']:g} s, each run beside a harness-floor run at the same rate "
            "just before it (bench/profile.py).",
            "",
            "| run | stream-infer p50 ms | p99 ms | p99.9 ms | max ms | floor p99 ms |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for i, r in enumerate(tail["runs"], start=1):
            s, f = r["stream_infer"], r["floor"]
            lines.append(
                f"| {i} | {s.get('p50_ms', float('nan')):.1f} | {s.get('p99_ms', float('nan')):.1f}"
                f" | {s.get('p999_ms', float('nan')):.1f} | {s.get('max_ms', float('nan')):.1f}"
                f" | {f.get('p99_ms', float('nan')):.1f} |"
            )
        if "met" in tail:
            lines += [
                "",
                f"Target: median p99 within {TAIL_MARGIN_MS:g} ms of the floor's: "
                f"{tail['p99_ms']:.1f} ms against {tail['floor_p99_ms']:.1f} ms, "
                f"{tail['over_floor_ms']:+.1f} ms: **{'met' if tail['met'] else 'missed'}**.",
            ]
        lines.append("")
    prof = results.get("profile")
    if prof and prof.get("threads"):
        sat = prof.get("saturation", {})
        lines += [
            "## Where the worker's CPU goes at saturation (py-spy)",
            "",
            f"stream-infer (default settings) at saturation: "
            f"{sat.get('throughput_eps', float('nan')):,.0f} events/s, "
            f"{sat.get('cpu_s_per_1k', float('nan')):.3f} CPU s per 1k events. CPU seconds per "
            f"OS thread over {prof.get('window_s', 0):g} s of py-spy sampling "
            "([flame graph](flamegraph.svg)):",
            "",
            "| thread | CPU s | share of a core |",
            "|---|---:|---:|",
        ]
        window = max(1e-9, float(prof.get("window_s") or 1.0))
        for row in prof["threads"][:12]:
            lines.append(
                f"| {row['thread']} | {row['cpu_s']:.2f} | {100 * row['cpu_s'] / window:.0f} % |"
            )
        lines += ["", "![flame graph](flamegraph.svg)", ""]
    return lines
