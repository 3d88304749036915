"""deploy/k8s rendered as ``kubectl kustomize`` renders it, for the features its
kustomizations use (resources, strategic-merge patches, images, namespace), and readers of the
rendered objects. Checked once against kustomize v5.8.1: identical objects, base and overlay.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from stream_infer.settings import Topology, parse_topology
from tests.deploy.layout import load_yaml

Doc = dict[str, Any]

# Lists that a strategic merge patch merges item by item, and the key that pairs the items.
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}


def strategic_merge(base: Any, patch: Any) -> Any:
    """Kubernetes' strategic merge, as far as these patches use it: maps merge recursively,
    lists with a merge key (containers and env by name...) merge item by item, any other list
    or scalar is replaced."""
    if not (isinstance(base, dict) and isinstance(patch, dict)):
        return copy.deepcopy(patch)
    out = copy.deepcopy(base)
    for key, value in patch.items():
        old = out.get(key)
        if key in _MERGE_KEYS and isinstance(old, list) and isinstance(value, list):
            merge_key = _MERGE_KEYS[key]
            for item in value:
                index = next(
                    (i for i, x in enumerate(old) if x.get(merge_key) == item.get(merge_key)), None
                )
                if index is None:
                    old.append(copy.deepcopy(item))
                else:
                    old[index] = strategic_merge(old[index], item)
        elif key in out:
            out[key] = strategic_merge(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def pod_spec(doc: Doc) -> Doc | None:
    if doc.get("kind") in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
        spec: Doc = doc["spec"]["template"]["spec"]
        return spec
    return None


def split_image(image: str) -> tuple[str, str | None]:
    """``registry:5000/name:tag`` -> (``registry:5000/name``, ``tag``)."""
    name, sep, tag = image.rpartition(":")
    if sep and "/" not in tag:
        return name, tag
    return image, None


def render_kustomization(directory: Path) -> list[Doc]:
    kust = load_yaml(directory / "kustomization.yaml")
    docs: list[Doc] = []
    for resource in kust.get("resources", []):
        path = directory / resource
        if path.is_dir():
            docs += render_kustomization(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    for entry in kust.get("patches", []):
        patch = load_yaml(directory / entry["path"])
        target = entry.get("target", {})
        kind = target.get("kind", patch["kind"])
        name = target.get("name", patch["metadata"]["name"])
        matched = [
            i for i, d in enumerate(docs) if (d["kind"], d["metadata"]["name"]) == (kind, name)
        ]
        assert matched, f"{directory}: patch {entry['path']} matches no {kind}/{name}"
        for i in matched:
            docs[i] = strategic_merge(docs[i], patch)
    for image in kust.get("images", []):
        for doc in docs:
            for container in (pod_spec(doc) or {}).get("containers", []):
                name, tag = split_image(container["image"])
                if name == image["name"]:
                    name = image.get("newName", name)
                    tag = image.get("newTag", tag)
                    container["image"] = f"{name}:{tag}" if tag else name
    if "namespace" in kust:
        for doc in docs:
            if doc["kind"] != "Namespace":
                doc["metadata"]["namespace"] = kust["namespace"]
    return docs


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and name in {None, d["metadata"]["name"]}]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def worker_pod(docs: list[Doc]) -> Doc:
    pod = pod_spec(one(docs, "Deployment"))
    assert pod is not None
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
