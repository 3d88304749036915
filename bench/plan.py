"""What one bench run does: sizes, rates, durations. A full plan and a quick (smoke) plan."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

PARTS = (
    "floor",
    "ceiling",
    "naive",
    "stream-infer",
    "exactly-once",
    "sweep",
    "scale",
    "peers",
    "models",
    "features",
    "tail",
    "profile",
)


@dataclass(frozen=True)
class Plan:
    quick: bool
    # Saturation: events pre-filled into the input topic before the system starts.
    events_fast: int  # ceiling and stream-infer
    events_naive: int  # the naive faust agent (an order of magnitude slower)
    # Open-loop latency runs, at these fractions of each system's measured saturation.
    latency_fractions: tuple[float, ...]
    latency_duration_s: float
    latency_warmup_s: float  # events generated in the first seconds are not counted
    # stream-infer batching sweep: saturation, then p99 at one fixed moderate rate.
    sweep_sizes: tuple[int, ...]
    sweep_waits_ms: tuple[float, ...]
    sweep_events: int
    sweep_duration_s: float
    sweep_warmup_s: float
    # A rate the broker of a small machine carries without queueing (see the floor); None:
    # half of stream-infer's default saturation (or the fallback if it was not measured).
    sweep_rate: float | None
    sweep_rate_fallback: float
    # 1 vs 2 workers in one consumer group.
    scale_events: int
    # The harness alone (load generator -> broker -> reader) at fixed rates.
    floor_rates: tuple[float, ...] = (1_000.0, 5_000.0, 10_000.0, 20_000.0, 40_000.0)
    floor_duration_s: float = 8.0
    floor_warmup_s: float = 2.0
    scale_workers: tuple[int, ...] = (1, 2)
    # Issue 16, parts "models" (each workload's forward pass at batch 1 and 256, no broker) and
    # "features" (ceiling and stream-infer saturated on 9, 64, 256 features and on 9 padded to
    # a 256-feature event's size; bench/features.py). Events per run, fewer for big events so
    # that a run's input stays under features_max_bytes.
    features_events: int = 100_000
    features_max_bytes: int = 300_000_000
    # Issue 16, part "peers": Quix Streams and Bytewax measured like the others (saturation,
    # latency at the fractions, RSS; small model), then rounds of saturation runs of the
    # ceiling, stream-infer (default), Quix and Bytewax in turn, the order rotated each round,
    # on each model; the targets use the medians. Saturation events per run: Quix serves one
    # event per forward pass (~5k events/s small, ~1k heavy), sized for ~15-25 s a run.
    peers_rounds: int = 3
    peers_events_fast: int = 200_000  # ceiling, stream-infer, Bytewax; small model
    peers_events_quix: int = 75_000
    peers_heavy_events_fast: int = 50_000  # heavy model (bench/workloads.py HEAVY)
    peers_heavy_events_quix: int = 10_000
    peers_workloads: tuple[str, ...] = ("small", "heavy")  # bench/workloads.py keys
    # Issue 16, part "tail" (bench/profile.py): stream-infer at tail_rate for tail_duration_s,
    # tail_runs times, each beside a floor run at the same rate; part "profile": py-spy on the
    # worker at saturation, profile_delay_s after its start (start-up and first fetch), for
    # profile_duration_s (the worker must still be busy: profile_events covers ~25 s at 40k/s).
    tail_rate: float = 5_000.0
    tail_duration_s: float = 20.0
    tail_runs: int = 3
    profile_events: int = 1_200_000
    profile_delay_s: float = 12.0
    profile_duration_s: float = 10.0
    # Harness.
    session_timeout_ms: int = 10_000
    start_timeout_s: float = 120.0  # until the first prediction
    stall_timeout_s: float = 20.0  # no new prediction for this long: give up waiting
    stop_grace_s: float = 10.0
    sample_interval_s: float = 0.1
    notes: tuple[str, ...] = field(default_factory=tuple)

    def with_overrides(self, **changes: object) -> Plan:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})  # type: ignore[arg-type]


FULL = Plan(
    quick=False,
    events_fast=200_000,
    events_naive=20_000,
    latency_fractions=(0.25, 0.5, 0.75),
    # Short on purpose: tansu slows down as a partition grows (bench/README.md, caveats).
    latency_duration_s=8.0,
    latency_warmup_s=2.0,
    sweep_sizes=(64, 256, 1024),
    sweep_waits_ms=(2.0, 10.0, 50.0),
    sweep_events=100_000,
    sweep_duration_s=8.0,
    sweep_warmup_s=2.0,
    sweep_rate=5_000.0,
    sweep_rate_fallback=5_000.0,
    scale_events=200_000,
)

QUICK = Plan(
    quick=True,
    events_fast=20_000,
    events_naive=1_500,
    latency_fractions=(0.5,),
    latency_duration_s=2.5,
    latency_warmup_s=0.5,
    sweep_sizes=(256,),
    sweep_waits_ms=(2.0,),
    sweep_events=10_000,
    sweep_duration_s=2.5,
    sweep_warmup_s=0.5,
    sweep_rate=2_000.0,
    sweep_rate_fallback=2_000.0,
    scale_events=20_000,
    floor_rates=(1_000.0, 10_000.0),
    floor_duration_s=2.0,
    floor_warmup_s=0.5,
    session_timeout_ms=6_000,
    start_timeout_s=60.0,
    stall_timeout_s=8.0,
    stop_grace_s=2.0,
    features_events=5_000,
    features_max_bytes=20_000_000,
    peers_events_fast=20_000,
    peers_events_quix=3_000,
    peers_heavy_events_fast=5_000,
    peers_heavy_events_quix=1_000,
    tail_rate=2_000.0,
    tail_duration_s=3.0,
    tail_runs=1,
    profile_events=150_000,
    profile_delay_s=12.0,
    profile_duration_s=3.0,
)
