"""Readers of the objects that ``kustomize build deploy/k8s`` renders (tests/deploy/tools.py):
the worker's pod, its container, its environment and the topology it runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from stream_infer.settings import Topology, parse_topology

Doc = dict[str, Any]


def parse_docs(text: str) -> list[Doc]:
    """A multi-document YAML stream as its objects, empty documents left out."""
    return [d for d in yaml.safe_load_all(text) if d]


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and name in {None, d["metadata"]["name"]}]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def split_image(image: str) -> tuple[str, str | None]:
    """``registry:5000/name:tag`` -> (``registry:5000/name``, ``tag``)."""
    name, sep, tag = image.rpartition(":")
    if sep and "/" not in tag:
        return name, tag
    return image, None


def worker_pod(docs: list[Doc]) -> Doc:
    pod: Doc = one(docs, "Deployment")["spec"]["template"]["spec"]
    return pod


def worker_container(docs: list[Doc]) -> Doc:
    containers: list[Doc] = worker_pod(docs)["containers"]
    assert len(containers) == 1
    return containers[0]


def worker_env(docs: list[Doc]) -> dict[str, str]:
    """The STREAM_INFER_* environment a worker pod gets: the ConfigMaps it takes with envFrom,
    then its literal env. Optional Secrets are left out: a PLAINTEXT cluster has none."""
    container = worker_container(docs)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env |= one(docs, "ConfigMap", source["configMapRef"]["name"])["data"]
        else:
            assert source["secretRef"].get("optional"), "a required Secret must be rendered too"
    env |= {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    return {k: v for k, v in env.items() if k.startswith("STREAM_INFER_")}


def worker_topology(docs: list[Doc]) -> Topology:
    """The topology a worker pod runs: the file its args name, read from the ConfigMap mounted
    there, with the pod's environment overrides applied."""
    container = worker_container(docs)
    path = Path(container["args"][-1])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent))
    volume = next(v for v in worker_pod(docs)["volumes"] if v["name"] == mount["name"])
    configmap = one(docs, "ConfigMap", volume["configMap"]["name"])
    return parse_topology(yaml.safe_load(configmap["data"][path.name]), env=worker_env(docs))
