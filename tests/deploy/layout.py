"""Where the deployment files are, and small readers for them (YAML, Dockerfiles)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "stream-infer.json"
DOCKERFILES = ("Dockerfile", "Dockerfile.cuda")
ORIGINAL_TOPOLOGY = ROOT / "topologies" / "phishing.yaml"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def dockerfile_steps(name: str) -> list[tuple[str, str]]:
    """deploy/NAME as (INSTRUCTION, arguments) pairs: continuation lines joined, comments
    dropped."""
    text = (DEPLOY / name).read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    steps = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, args = line.strip().partition(" ")
            steps.append((instruction.upper(), args.strip()))
    return steps


def instruction_args(name: str, instruction: str) -> list[str]:
    return [args for ins, args in dockerfile_steps(name) if ins == instruction]


def final_stage(name: str) -> list[tuple[str, str]]:
    steps = dockerfile_steps(name)
    last_from = max(i for i, (ins, _) in enumerate(steps) if ins == "FROM")
    return steps[last_from:]


def image_root() -> str:
    """The folder of the image that holds the repository's models/ (/opt/stream-infer)."""
    for args in instruction_args("Dockerfile", "COPY"):
        parts = args.split()
        if parts[0] == "models/":
            return parts[1].rstrip("/").rsplit("/", 1)[0]
    raise AssertionError("deploy/Dockerfile does not copy models/")
