"""Parts "models" and "features" (issue 16 items 2 and 3): what the work costs.

**models**: each workload's model (bench/workloads.py): its architecture, its parameters, one
forward pass's wall time at batch 1 and 256 (``TorchPredictor.predict_many``, one intra-op
thread, as the worker calls it, in a fresh interpreter), and its events' mean size. No broker.

**features**: the ceiling and stream-infer (default settings) at saturation on 9, 64 and 256
features per event (the model n-16-16-1, synthetic standard-normal features), and on the 9
features with ~7.5 KB of ignored text in each event (the size of a 256-feature event): how the
CPU per 1,000 events grows with the feature count and with the event's size. Each point is one
fresh saturation run per system, the two systems in alternating order; the events per run are
``plan.features_events``, fewer for big events (at most ``plan.features_max_bytes`` of input).

The tables (:func:`markdown_lines`) and the plot (:func:`plot`) are computed from
``results.json`` only.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.workloads import ALL, FEATURE_SWEEP, Workload

SYSTEMS = ("ceiling", "stream-infer")
LABELS = {"ceiling": "ceiling", "stream-infer": "stream-infer (default)"}


def _say(msg: str) -> None:
    from bench.runner import say

    say(msg)


def measure_models(workloads: tuple[Workload, ...] = ALL) -> dict[str, Any]:
    """results["workloads"]: per workload, what it is, its forward pass's cost and its
    events' mean size."""
    from bench.events import pool_for
    from bench.workloads import describe, measure_cost_subprocess, topology

    out: dict[str, Any] = {}
    for w in workloads:
        pool = pool_for(topology(w), w.event_padding)
        cost = measure_cost_subprocess(w)
        b = cost["batches"]
        out[w.key] = (
            describe(w)
            | {"event_padding": w.event_padding, "mean_event_bytes": pool.mean_event_bytes()}
            | {"forward": cost, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        )
        _say(
            f"model {w.key} ({w.architecture}): forward {b['1']['median_ms']:.3f} ms at batch 1, "
            f"{b['256']['median_ms']:.3f} ms at batch 256; events "
            f"{out[w.key]['mean_event_bytes']:,.0f} B"
        )
    return out


def _spec(system: str, w: Workload) -> Any:
    from bench.systems import SystemSpec

    kind = "ceiling" if system == "ceiling" else "stream-infer"
    return SystemSpec(f"{w.key}-{system}", f"{LABELS[system]}, {w.label}", kind, workload=w)


def measure_features(ctx: Any, plan: Any) -> dict[str, Any]:
    """results["features"]: one saturation run per system and workload of the sweep."""
    from bench import runner
    from bench.events import pool_for
    from bench.workloads import topology

    points = []
    for i, w in enumerate(FEATURE_SWEEP):
        bytes_ = pool_for(topology(w), w.event_padding).mean_event_bytes()
        n = max(1_000, min(plan.features_events, int(plan.features_max_bytes // bytes_)))
        point: dict[str, Any] = {
            "workload": w.key,
            "label": w.label,
            "n_features": w.n_features,
            "event_padding": w.event_padding,
            "mean_event_bytes": bytes_,
            "events": n,
            "systems": {},
        }
        order = SYSTEMS if i % 2 == 0 else SYSTEMS[::-1]
        for system in order:
            spec = _spec(system, w)
            try:
                with runner.SystemRun(ctx, spec) as run:
                    sat = run.saturation(n)
                    peak = run.peak_rss_bytes
            except runner.SystemFailed as exc:
                _say(f"features {w.key} {system}: FAILED {exc}")
                point["systems"][system] = {"error": str(exc)}
                continue
            point["systems"][system] = {"saturation": sat, "peak_rss_bytes": peak}
            _say(
                f"features {w.key} ({bytes_:,.0f} B/event) {system}: "
                f"{sat['throughput_eps']:,.0f} events/s, {sat['cpu_s_per_1k']:.3f} CPU s/1k"
            )
        points.append(point)
    return {
        "systems": {s: LABELS[s] for s in SYSTEMS},
        "events_max": plan.features_events,
        "max_input_bytes": plan.features_max_bytes,
        "points": points,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# --- the report ------------------------------------------------------------------------------


def _f(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _sat(point: dict[str, Any], system: str) -> dict[str, Any]:
    return ((point.get("systems") or {}).get(system) or {}).get("saturation") or {}


def _ratio(a: Any, b: Any) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def busy(sat: dict[str, Any], stage: str) -> float | None:
    """The share of the saturation window the worker's inference thread spent in ``stage``
    (its histogram's count x mean over the window; one worker)."""
    st = (sat.get("stages") or {}).get(stage) or {}
    if not st.get("count") or st.get("mean_ms") is None or not sat.get("window_s"):
        return None
    return float(st["count"] * st["mean_ms"] / 1000.0 / sat["window_s"])


def models_md(results: dict[str, Any]) -> list[str]:
    workloads = results.get("workloads") or {}
    if not workloads:
        return []
    lines = [
        "## The models (workloads)",
        "",
        "One forward pass of each workload's model (bench/workloads.py), as the worker calls "
        "it (`TorchPredictor.predict_many`, one intra-op thread, CPU), median wall time of "
        "repeated calls in a fresh process; and its events' mean size in bytes (JSON).",
        "",
        "| workload | model | parameters | features | batch 1 ms | batch 256 ms "
        "| us per event at 256 | event bytes |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, w in workloads.items():
        b = (w.get("forward") or {}).get("batches") or {}
        one, many = b.get("1") or {}, b.get("256") or {}
        lines.append(
            f"| {key} | {w.get('architecture')} | {_f(w.get('parameters'), ',')} | "
            f"{w.get('n_features')} | {_f(one.get('median_ms'), '.3f')} | "
            f"{_f(many.get('median_ms'), '.2f')} | {_f(many.get('per_event_us'), '.2f')} | "
            f"{_f(w.get('mean_event_bytes'), ',.0f')} |"
        )
    return [*lines, ""]


def features_md(results: dict[str, Any]) -> list[str]:
    feats = results.get("features") or {}
    points = feats.get("points") or []
    if not points:
        return []
    lines = [
        "## CPU against the feature count and the event's size",
        "",
        "The ceiling and stream-infer (default settings) at saturation, one fresh run each per "
        "row, on n synthetic features per event (model n-16-16-1), and on 9 features padded "
        "with an ignored text field to about the size of a 256-feature event. CPU is the "
        "system's user+sys per 1,000 events over its saturation window. **busy**: the share "
        "of stream-infer's window its inference thread spent processing batches (decode, "
        "infer, encode, produce calls), and in brackets the model's part of it, from the "
        "worker's histograms: wall time, which on a busy machine includes waiting for a CPU "
        "or the GIL, so read it beside the CPU column. Plot: `cpu_vs_features.png`.",
        "",
        "| features | event bytes | events | ceiling events/s | ceiling CPU s/1k "
        "| stream-infer events/s | stream-infer CPU s/1k | busy (model) | throughput vs ceiling "
        "| CPU vs ceiling |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        c, s = _sat(p, "ceiling"), _sat(p, "stream-infer")
        work, model = busy(s, "processing"), busy(s, "model")
        name = f"{p.get('n_features')}"
        if p.get("event_padding"):
            name += f" + {p['event_padding']:,} B padding"
        lines.append(
            f"| {name} | {_f(p.get('mean_event_bytes'), ',.0f')} | {_f(p.get('events'), ',')} | "
            f"{_f(c.get('throughput_eps'), ',.0f')} | {_f(c.get('cpu_s_per_1k'), '.3f')} | "
            f"{_f(s.get('throughput_eps'), ',.0f')} | {_f(s.get('cpu_s_per_1k'), '.3f')} | "
            f"{_f(work, '.0%')} ({_f(model, '.0%')}) | "
            f"{_ratio(s.get('throughput_eps'), c.get('throughput_eps'))} | "
            f"{_ratio(s.get('cpu_s_per_1k'), c.get('cpu_s_per_1k'))} |"
        )
    failed = [
        f"{p['workload']} {name}: {r['error'].splitlines()[0][:200]}"
        for p in points
        for name, r in (p.get("systems") or {}).items()
        if "error" in r
    ]
    if failed:
        lines += ["", "Failed runs: " + "; ".join(failed)]
    return [*lines, ""]


def markdown_lines(results: dict[str, Any]) -> list[str]:
    lines = models_md(results) + features_md(results)
    if (results.get("features") or {}).get("points"):
        lines += ["![CPU per 1k events against the feature count](cpu_vs_features.png)", ""]
    return lines


def plot(results: dict[str, Any], path: Path) -> bool:
    """CPU s per 1k events against the feature count, one line per system; the events'
    mean size on a second axis; the padded point as a separate marker."""
    points = (results.get("features") or {}).get("points") or []
    plain = sorted((p for p in points if not p.get("event_padding")), key=lambda p: p["n_features"])
    padded = [p for p in points if p.get("event_padding")]
    if not plain:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, system in enumerate(SYSTEMS):
        rows = [(p["n_features"], _sat(p, system).get("cpu_s_per_1k")) for p in plain]
        rows = [(x, y) for x, y in rows if y is not None]
        if rows:
            ax.plot(*zip(*rows, strict=True), "o-", color=f"C{i}", label=LABELS[system])
        for p in padded:
            y = _sat(p, system).get("cpu_s_per_1k")
            if y is not None:
                ax.plot(
                    [p["n_features"]],
                    [y],
                    "D",
                    color=f"C{i}",
                    markerfacecolor="none",
                    markersize=9,
                    label=f"{LABELS[system]}, {p['n_features']} features + "
                    f"{p['event_padding']:,} B padding",
                )
    ax.set_xscale("log", base=2)
    xs = [p["n_features"] for p in plain]
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel("features per event (log scale)")
    ax.set_ylabel("CPU s per 1,000 events (system, saturated)")
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(xs, [p["mean_event_bytes"] for p in plain], "s:", color="gray", label="event bytes")
    ax2.set_ylabel("mean event size (bytes, dotted grey)")
    ax2.set_ylim(bottom=0)
    handles, labels = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(handles + h2, labels + l2, fontsize=8, loc="upper left")
    ax.set_title("CPU per 1k events against the feature count (model n-16-16-1)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True
