from __future__ import annotations

import json
from typing import Any

import pytest

from tests.deploy.kustomize import Doc, render_kustomization
from tests.deploy.layout import DASHBOARD, DEPLOY, K8S, load_yaml


@pytest.fixture(scope="session")
def base_docs() -> list[Doc]:
    """deploy/k8s rendered: the CPU deployment."""
    return render_kustomization(K8S)


@pytest.fixture(scope="session")
def gpu_docs() -> list[Doc]:
    """deploy/k8s/gpu rendered: the GPU overlay."""
    return render_kustomization(K8S / "gpu")


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(DEPLOY / "compose.yaml")
    return data


@pytest.fixture(scope="session")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data
