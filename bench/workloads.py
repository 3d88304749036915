"""The bench's workloads: which model every system serves, on which features (issue 16).

A :class:`Workload` names a feature list and an MLP. ``SMALL`` is the shipped phishing model
(``models/phishing/risk/v1``, 9-16-16-1, on River's Phishing rows): what every part served
before workloads existed, and still the default. The others are built here, by the project's
own code (no downloads): a seeded MLP, untrained (its weights are its seed's), written with
``stream_infer.inference.store.save_export`` (torch.export, dynamic batch, ``meta.json`` with
its sha256 and features), so the worker loads and checks it exactly as it loads a real model.
They are built once and cached in ``bench/.models/<key>-<fingerprint>/`` (git-ignored); the
fingerprint covers the features, the layer widths, the seed and the torch version.

- ``HEAVY``: the same 9 features and events as ``SMALL``, an MLP 9-2048-2048-1 (4.2 M
  weights, 16 MiB): on these CPUs (AMD EPYC, 32 MiB L3) one forward pass at batch 1 with one
  intra-op thread, as the worker runs it, was measured at ~0.8 ms (9-1024-1024-1: ~0.14 ms,
  its 4 MiB of weights stay in cache); at batch 256, ~25 ms (~0.1 ms an event).
- ``FEATURES_9`` / ``FEATURES_64`` / ``FEATURES_256``: n synthetic features ``feat_000``...,
  an MLP n-16-16-1 (today's shape), events from ``synthetic_events`` (seeded standard-normal
  values, full float64 precision in the JSON). The 9-feature one has the same generator as
  the others, so the feature sweep changes only the count (and with it the event's size).

    python -m bench.workloads build [KEY ...]   # build (or find) the artifacts
    python -m bench.workloads cost KEY          # one forward pass's cost, as JSON
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stream_infer.examples import phishing
from stream_infer.settings import Topology, parse_topology

ROOT = Path(__file__).resolve().parent.parent
BASE_TOPOLOGY = ROOT / "topologies" / "phishing.yaml"
MODELS_DIR = Path(__file__).resolve().parent / ".models"  # git-ignored
SMALL_ARTIFACT = ROOT / "models" / "phishing" / "risk" / "v1"
MODEL_NAME = "risk"  # the shipped topology's model name: the topics keep their names
VERSION = "v1"
COST_BATCH_SIZES = (1, 256)


@dataclass(frozen=True)
class Workload:
    """A model and the features it reads. ``shipped``: a model directory used as is (SMALL)."""

    key: str  # results key
    label: str  # for tables and plots
    features: tuple[str, ...]
    hidden: tuple[int, ...]  # hidden layer widths of the MLP: n -> hidden... -> 1
    seed: int = 0
    shipped: Path | None = None
    # Bytes of an extra top-level string field in each event, which the worker parses and
    # ignores (bench/events.py): a bigger event with the same features and model.
    event_padding: int = 0

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def architecture(self) -> str:
        return "MLP " + "-".join(str(n) for n in (self.n_features, *self.hidden, 1))

    @property
    def n_parameters(self) -> int:
        widths = (self.n_features, *self.hidden, 1)
        return sum(a * b + b for a, b in itertools.pairwise(widths))

    @property
    def is_base(self) -> bool:
        """The shipped topology as it is (models, versions and features unchanged)."""
        return self.shipped is not None and self.features == phishing.FEATURES

    def fingerprint(self) -> str:
        import torch

        doc = {
            "features": list(self.features),
            "hidden": list(self.hidden),
            "seed": self.seed,
            "torch": torch.__version__,
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]


def synthetic_features(n: int) -> tuple[str, ...]:
    return tuple(f"feat_{i:03d}" for i in range(n))


def _features_workload(n: int) -> Workload:
    return Workload(
        f"features-{n}",
        f"{n} features (MLP {n}-16-16-1)",
        synthetic_features(n),
        (16, 16),
        seed=n,
    )


SMALL = Workload(
    "small",
    "small: phishing MLP 9-16-16-1 (shipped)",
    phishing.FEATURES,
    (16, 16),
    shipped=SMALL_ARTIFACT,
)
HEAVY = Workload("heavy", "heavy: MLP 9-2048-2048-1", phishing.FEATURES, (2048, 2048), seed=7)
FEATURES_9 = _features_workload(9)
FEATURES_64 = _features_workload(64)
FEATURES_256 = _features_workload(256)
# The 9-feature events and model with ~7.5 KB of ignored text in each event: about the size
# of a 256-feature event, so the sweep tells the bytes' cost from the features'.
FEATURES_9_PADDED = Workload(
    "features-9-padded",
    "9 features + 7,500 B ignored field (MLP 9-16-16-1)",
    synthetic_features(9),
    (16, 16),
    seed=9,
    event_padding=7_500,
)
FEATURE_SWEEP = (FEATURES_9, FEATURES_64, FEATURES_256, FEATURES_9_PADDED)
ALL = (SMALL, HEAVY, *FEATURE_SWEEP)
BY_KEY = {w.key: w for w in ALL}


def _module(workload: Workload) -> Any:
    import torch

    torch.manual_seed(workload.seed)
    layers: list[torch.nn.Module] = []
    widths = (workload.n_features, *workload.hidden)
    for a, b in itertools.pairwise(widths):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    layers.append(torch.nn.Linear(widths[-1], 1))
    return torch.nn.Sequential(*layers).eval()


def artifact_dir(workload: Workload, models_dir: Path = MODELS_DIR) -> Path:
    """The version directory (``meta.json`` + ``model.pt2``) of the workload's model, built
    on first use. Safe against a concurrent build (each builds aside, then renames)."""
    if workload.shipped is not None:
        return workload.shipped
    from stream_infer.inference.store import ModelMeta, save_export, sha256_file

    dest = models_dir / f"{workload.key}-{workload.fingerprint()}"
    if (dest / "meta.json").is_file():
        with contextlib.suppress(Exception):  # corrupt or half-written: build it again
            meta = ModelMeta.read(dest)
            if meta.features == workload.features and sha256_file(dest / meta.artifact) == (
                meta.sha256
            ):
                return dest
    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{workload.key}-", dir=models_dir))
    tmp.chmod(0o755)
    try:
        save_export(
            _module(workload),
            tmp,
            features=workload.features,
            output="logit",
            description=f"bench workload {workload.key}: {workload.architecture}, "
            f"seeded (seed {workload.seed}), untrained",
        )
        if dest.exists():
            shutil.rmtree(dest, ignore_errors=True)
        with contextlib.suppress(OSError):  # another process won the race: keep its copy
            os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def topology_data(workload: Workload, base: Path = BASE_TOPOLOGY) -> dict[str, Any]:
    """The base topology's mapping with the workload's features and model (model paths
    absolute). For ``SMALL`` (``is_base``) only the paths change: models, versions and
    features are the shipped file's. Otherwise the one model ``risk`` has one version ``v1``,
    the workload's artifact, and ``features`` is the workload's list: the worker validates
    every event against exactly that list, as in production."""
    data: dict[str, Any] = yaml.safe_load(base.read_text(encoding="utf-8"))
    if workload.is_base:
        for model in data["models"]:
            for version in model["versions"]:
                version["path"] = str((base.parent / version["path"]).resolve())
        return data
    data["features"] = list(workload.features)
    data["models"] = [
        {
            "name": MODEL_NAME,
            "serving": VERSION,
            "versions": [{"version": VERSION, "path": str(artifact_dir(workload))}],
        }
    ]
    return data


def topology(workload: Workload, base: Path = BASE_TOPOLOGY) -> Topology:
    """The workload's topology, validated (no environment overrides)."""
    return parse_topology(topology_data(workload, base), base_dir=base.parent, env={})


# --- the model's cost ------------------------------------------------------------------------


def measure_cost(
    workload: Workload,
    batch_sizes: tuple[int, ...] = COST_BATCH_SIZES,
    *,
    budget_s: float = 1.5,
    threads: int = 1,
) -> dict[str, Any]:
    """One forward pass's wall time at each batch size, in this process, as the worker runs
    it: ``TorchPredictor.predict_many`` (numpy in, sigmoid, numpy out) with ``threads``
    intra-op threads (the topology's ``worker.inference_threads``, 1), after its warm-up.
    Median and p90 of repeated calls for about ``budget_s`` each. Sets torch's thread count
    for the whole process: run it in a subprocess (:func:`measure_cost_subprocess`)."""
    import numpy as np
    import torch

    from stream_infer.inference.predictor import TorchPredictor

    torch.set_num_threads(threads)
    _meta, predictor = TorchPredictor.load(
        artifact_dir(workload),
        model=MODEL_NAME,
        version=VERSION,
        features=workload.features,
        device=torch.device("cpu"),
    )
    predictor.warm_up()
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    for n in batch_sizes:
        x = rng.standard_normal((n, workload.n_features)).astype(np.float32)
        for _ in range(5):
            predictor.predict_many(x)
        times: list[float] = []
        t_end = time.perf_counter() + budget_s
        while len(times) < 20 or (time.perf_counter() < t_end and len(times) < 5000):
            t0 = time.perf_counter()
            result = predictor.predict_many(x)
            times.append(time.perf_counter() - t0)
        assert result.shape == (n,)
        times.sort()
        median = statistics.median(times)
        out[str(n)] = {
            "batch": n,
            "calls": len(times),
            "median_ms": median * 1e3,
            "p90_ms": times[int(0.9 * (len(times) - 1))] * 1e3,
            "per_event_us": median * 1e6 / n,
        }
    return {
        "threads": threads,
        "torch": torch.__version__,
        "loadavg_1m": os.getloadavg()[0],
        "batches": out,
    }


def measure_cost_subprocess(workload: Workload, timeout_s: float = 300.0) -> dict[str, Any]:
    """:func:`measure_cost` in a fresh interpreter (its own torch thread settings)."""
    cmd = [sys.executable, "-m", "bench.workloads", "cost", workload.key]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout_s, check=False, cwd=ROOT
    )
    if done.returncode != 0:
        msg = f"{' '.join(cmd)} exited {done.returncode}: {done.stderr[-2000:]}"
        raise RuntimeError(msg)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def describe(workload: Workload) -> dict[str, Any]:
    """What results.json says about a workload (without its measured cost)."""
    path = artifact_dir(workload)
    try:
        where = str(path.relative_to(ROOT))
    except ValueError:
        where = str(path)
    return {
        "label": workload.label,
        "architecture": workload.architecture,
        "parameters": workload.n_parameters,
        "n_features": workload.n_features,
        "features": "phishing (River's Phishing rows)"
        if workload.features == phishing.FEATURES
        else f"synthetic: {workload.features[0]}..{workload.features[-1]}, standard normal",
        "artifact": where,
        "built_by": "shipped (stream-infer build-example-models)"
        if workload.shipped
        else "bench/workloads.py (seeded, untrained)",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.workloads")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build (or find) the workloads' artifacts")
    b.add_argument("keys", nargs="*", help=f"of {', '.join(BY_KEY)} (default: all)")
    c = sub.add_parser("cost", help="a forward pass's cost at batch 1 and 256, as JSON")
    c.add_argument("key", choices=list(BY_KEY))
    args = parser.parse_args(argv)
    if args.command == "build":
        unknown = sorted(set(args.keys) - set(BY_KEY))
        if unknown:
            parser.error(f"unknown workload(s) {unknown}; choose from {', '.join(BY_KEY)}")
        for key in args.keys or list(BY_KEY):
            w = BY_KEY[key]
            print(f"{key}: {w.architecture} -> {artifact_dir(w)}")
        return 0
    print(json.dumps(measure_cost(BY_KEY[args.key])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
