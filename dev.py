#!/usr/bin/env python3
"""Set up the project and run it: the only entry point a new user needs.

    python3 dev.py demo     # venv + install, then the demo: broker, worker, events, predictions
    python3 dev.py test     # venv + install, then lint, type-check and the whole test suite
    python3 dev.py bench    # venv + install, then the benchmark (bench/README.md)
    python3 dev.py soak     # venv + install, then the long fault/overload tests (not in CI)
    python3 dev.py setup    # only the venv + install

Needs only Python >= 3.11 and pip. Uses the standard library alone, because it runs before
anything is installed. torch is installed first, pinned (override with STREAM_INFER_TORCH_SPEC),
so the resolver never picks another build while resolving the project's range. PyPI's torch
2.13.0 wheel needs its CUDA libraries even on a CPU-only machine (importing torch loads them),
so the venv is about 5.4 GB; pip's cache and the venv's stamp make later runs instant.

The integration tests start Apache Kafka themselves where Java 17+ and Maven are on PATH
(resolved once from Maven Central into ~/.cache/stream-infer), else the embedded tansu broker,
and pytest's header says which.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".stream-infer-installed"
PEERS_STAMP = VENV / ".stream-infer-peers-installed"
TORCH_SPEC = os.environ.get("STREAM_INFER_TORCH_SPEC", "torch==2.13.0")


def _run(*cmd: str | Path) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)


def setup(*, peers: bool = False) -> None:
    """The venv with the package, its dev and bench extras; with ``peers`` (the bench only) also
    the peers the bench compares with: never needed by the demo or the tests, and Bytewax has
    wheels for fewer platforms than the rest."""
    if sys.version_info < (3, 11):  # noqa: UP036 (dev.py runs under any python3)
        sys.exit(f"stream-infer needs Python >= 3.11, this is {sys.version.split()[0]}")
    if not PY.exists():
        print(f"creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + TORCH_SPEC.encode()).hexdigest()
    pip = (PY, "-m", "pip", "install", "--disable-pip-version-check", "-q")
    if not (STAMP.exists() and STAMP.read_text() == want):
        _run(*pip, TORCH_SPEC)
        _run(*pip, "-e", ".[dev,bench]")
        STAMP.write_text(want)
    if not peers or (PEERS_STAMP.exists() and PEERS_STAMP.read_text() == want):
        return
    _run(*pip, "-e", ".[dev,bench,peers]")
    # The bench's Quix Streams peer caps confluent-kafka and pydantic below ours: its own folder,
    # put on sys.path only by bench/peer_quix.py (pyproject.toml, [tool.stream-infer.bench]).
    import tomllib  # here: dev.py must reach the version check above on any python3

    quix = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["stream-infer"]["bench"]
    _run(*pip, "--upgrade", "--target", VENV / "peers-quix", *quix["quix"])
    PEERS_STAMP.write_text(want)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"setup", "demo", "test", "bench", "soak"}:
        print(__doc__)
        return 2
    what, rest = argv[0], argv[1:]
    setup(peers=what == "bench")
    try:
        if what == "demo":
            _run(BIN / "stream-infer", "demo", *rest)
        elif what == "test":
            _run(PY, "-m", "ruff", "check", ".")
            _run(PY, "-m", "ruff", "format", "--check", ".")
            _run(PY, "-m", "mypy")
            _run(PY, "-m", "pytest", "-m", "not soak", *rest)
        elif what == "soak":
            _run(PY, "-m", "pytest", "-m", "soak", *rest)
        elif what == "bench":
            _run(PY, "-m", "bench", *rest)
    except subprocess.CalledProcessError as exc:
        return exc.returncode or 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
