from __future__ import annotations

import json
from typing import Any

import pytest

from tests.deploy import tools
from tests.deploy.layout import DASHBOARD, DEPLOY, K8S, load_yaml
from tests.deploy.rendered import Doc, parse_docs


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The first test that needs the tools may build them (about a minute, more on a busy
    machine): give the tests that use them the install's time on top of the usual limit."""
    for item in items:
        if "deploy_tools" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.timeout(tools.GO_INSTALL_TIMEOUT_S + 300))


@pytest.fixture(scope="session")
def deploy_tools(tmp_path_factory: pytest.TempPathFactory) -> tools.Tools:
    """kustomize, kubeconform and their schemas (tests/deploy/tools.py), built with Go the
    first time. Without Go, the tests that need them skip, saying so."""
    try:
        return tools.install(tmp_path_factory.mktemp("schemas"))
    except tools.GoMissingError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def manifests(deploy_tools: tools.Tools) -> dict[str, str]:
    """``kustomize build`` of deploy/k8s (``base``: the CPU deployment) and of deploy/k8s/gpu
    (``gpu``: the GPU overlay), as the multi-document YAML that ``kubectl apply -k`` sends."""
    return {"base": deploy_tools.build(K8S), "gpu": deploy_tools.build(K8S / "gpu")}


@pytest.fixture(scope="session")
def base_docs(manifests: dict[str, str]) -> list[Doc]:
    """deploy/k8s rendered: the CPU deployment."""
    return parse_docs(manifests["base"])


@pytest.fixture(scope="session")
def gpu_docs(manifests: dict[str, str]) -> list[Doc]:
    """deploy/k8s/gpu rendered: the GPU overlay."""
    return parse_docs(manifests["gpu"])


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(DEPLOY / "compose.yaml")
    return data


@pytest.fixture(scope="session")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data
