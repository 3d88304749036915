"""The systems under test, and the per-run topology file they all read.

Every run gets its own copy of the phishing topology: topics ``bench.<run>.*`` (fresh, so no
run sees another's records), its own consumer group (a tansu group wedged by a killed consumer
must not affect the next run), a free web port, absolute model paths and ``device: cpu``. The
ceiling and the naive agent read the same file for the broker, topics, features and model, so
all three serve the same model to the same events.
"""

from __future__ import annotations

import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from bench.workloads import SMALL, Workload, topology_data
from stream_infer.local.tansu import free_port
from stream_infer.settings import Topology, load_topology

ROOT = Path(__file__).resolve().parent.parent
BASE_TOPOLOGY = ROOT / "topologies" / "phishing.yaml"

Kind = Literal["ceiling", "naive", "stream-infer", "quix", "bytewax"]


@dataclass(frozen=True)
class SystemSpec:
    key: str  # results key
    label: str  # for tables and plots
    kind: Kind
    batching: dict[str, float] = field(default_factory=dict)  # overrides; empty = as shipped
    workers: int = 1
    # processing.guarantee; exactly_once also drops the shipped max_batches_in_flight (see
    # write_topology): the product's own default under exactly_once applies.
    guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"
    # The model and features served (bench/workloads.py); SMALL is the shipped topology's.
    workload: Workload = SMALL
    # Extra command-line arguments of a peer (bench/peer_bytewax.py: its batching).
    args: tuple[str, ...] = ()

    def commands(self, topology_path: Path) -> list[list[str]]:
        py = sys.executable
        if self.kind == "ceiling":
            return [[py, "-m", "bench.ceiling", str(topology_path)]]
        if self.kind == "naive":
            return [[py, "-m", "bench.naive_faust", str(topology_path)]]
        if self.kind == "quix":
            return [[py, "-m", "bench.peer_quix", str(topology_path)]]
        if self.kind == "bytewax":
            return [[py, "-m", "bench.peer_bytewax", str(topology_path), *self.args]]
        cmd = [py, "-m", "stream_infer", "--log-level", "info", "worker", str(topology_path)]
        return [list(cmd) for _ in range(self.workers)]


CEILING = SystemSpec("ceiling", "ceiling (plain confluent-kafka loop)", "ceiling")
NAIVE = SystemSpec("naive", "naive faust (one event at a time)", "naive")
STREAM_INFER_DEFAULT = SystemSpec("stream-infer-default", "stream-infer (default)", "stream-infer")
# Issue 16: the peers a Python user would pick instead, each in its idiom (bench/README.md).
QUIX = SystemSpec("quix", "Quix Streams 3.28.1 (per-message apply)", "quix")
BYTEWAX = SystemSpec(
    "bytewax",
    "Bytewax 0.21.1 (flat_map_batch, one forward pass per poll batch)",
    "bytewax",
    args=("--batching", "flat_map_batch"),
)
BYTEWAX_COLLECT = SystemSpec(
    "bytewax-collect",
    "Bytewax 0.21.1 (collect 1000 / 10 ms, one forward pass per list)",
    "bytewax",
    args=("--batching", "collect", "--batch", "1000", "--max-wait-ms", "10"),
)
# Issue 15: the same worker and default batching, each micro-batch one Kafka transaction.
STREAM_INFER_EXACTLY_ONCE = SystemSpec(
    "stream-infer-exactly-once",
    "stream-infer (exactly_once, default batching)",
    "stream-infer",
    guarantee="exactly_once",
)


def stream_infer_with(
    batch_size: int,
    wait_ms: float,
    *,
    key: str,
    label: str,
    workers: int = 1,
    workload: Workload = SMALL,
) -> SystemSpec:
    return SystemSpec(
        key,
        label,
        "stream-infer",
        batching={"max_batch_size": batch_size, "max_wait_ms": wait_ms},
        workers=workers,
        workload=workload,
    )


def write_topology(
    dest_dir: Path,
    *,
    run_id: str,
    bootstrap_servers: str,
    session_timeout_ms: int,
    batching: dict[str, float],
    guarantee: str = "at_least_once",
    base: Path = BASE_TOPOLOGY,
    workload: Workload = SMALL,
) -> tuple[Path, Topology]:
    """Write this run's topology file and return it, loaded and validated (no env overrides).

    Under ``exactly_once`` the shipped file's ``batching.max_batches_in_flight`` (4, the
    at_least_once default written out) is dropped unless ``batching`` sets it: the product's
    default under exactly_once (2) applies, as it would to a topology that does not set it.

    ``workload`` sets the features and the model (bench/workloads.py: for SMALL, the shipped
    file's models and features; otherwise one version, the workload's artifact, built on
    first use)."""
    data: dict[str, Any] = topology_data(workload, base)
    data["kafka"] = dict(data.get("kafka") or {}) | {
        "bootstrap_servers": bootstrap_servers,
        "group_id": f"bench-{run_id}",
        "session_timeout_ms": session_timeout_ms,
    }
    topics = dict(data["topics"])
    for name, value in list(topics.items()):
        if isinstance(value, str):
            topics[name] = f"bench.{run_id}.{value.rsplit('.', 1)[-1]}"
    data["topics"] = topics
    data["worker"] = dict(data.get("worker") or {}) | {"web_port": free_port()}
    data["device"] = "cpu"
    if guarantee != "at_least_once":
        data["processing"] = dict(data.get("processing") or {}) | {"guarantee": guarantee}
        if "max_batches_in_flight" not in batching:
            data["batching"] = {
                k: v
                for k, v in (data.get("batching") or {}).items()
                if k != "max_batches_in_flight"
            }
    if batching:
        data["batching"] = dict(data.get("batching") or {}) | batching
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / f"{run_id}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path, load_topology(path, env={})


def new_run_id(key: str) -> str:
    return f"{key}-{uuid.uuid4().hex[:8]}"
