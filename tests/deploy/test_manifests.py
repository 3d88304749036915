"""The deployment files under deploy/: linted, validated, and checked against each other and
against the code they deploy. No broker, no Docker, no cluster. This module: YAML, Kubernetes,
KEDA, topologies; test_containers.py: Dockerfiles and compose; test_dashboard.py: Grafana.

- YAML: yamllint on every YAML file under deploy/ (``YAMLLINT_CONFIG``; warnings fail too).
- Kubernetes: deploy/k8s rendered by the real kustomize (``kustomize build``), the CPU base and
  the GPU overlay, every object validated by kubeconform, strict (unknown fields fail), for
  each version in ``K8S_VERSIONS``, against the schemas kubernetes-validate ships; both tools
  are built with Go on first use (tests/deploy/tools.py), and these tests skip without Go.
- KEDA: the ScaledObject is validated by kubeconform too, against the schema of KEDA's own CRD
  (from the ``github.com/kedacore/keda/v2`` Go module, made strict), its HPA behaviour against
  Kubernetes' own HorizontalPodAutoscaler schema, and structurally: its consumer group and
  topic are the topology's, and its maxReplicaCount is at most the input topic's partition
  count.
- Topologies: deploy/topology.yaml and the ConfigMap's validate with parse_topology, with the
  environment the deployment gives them, and agree with topologies/phishing.yaml.

Not checked here: that the manifests apply to a live cluster with KEDA installed.
"""

from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

from stream_infer.io.publisher import Publisher
from stream_infer.io.source import BatchSource
from stream_infer.settings import Topology, load_topology
from tests.deploy.layout import (
    DEPLOY,
    K8S,
    ORIGINAL_TOPOLOGY,
    ROOT,
    final_stage,
    image_root,
    instruction_args,
    load_yaml,
)
from tests.deploy.rendered import (
    Doc,
    one,
    parse_docs,
    split_image,
    worker_container,
    worker_pod,
    worker_topology,
)
from tests.deploy.tools import Tools, kubernetes_versions

# The oldest Kubernetes these manifests target, and the newest kubernetes-validate has schemas of.
K8S_VERSIONS = ("1.30.0", kubernetes_versions()[-1])

YAMLLINT_CONFIG = """
extends: default
rules:
  line-length:
    max: 100
  document-start: disable
"""


# --- YAML ----------------------------------------------------------------------------------


def test_yamllint_every_yaml_file() -> None:
    config = YamlLintConfig(YAMLLINT_CONFIG)
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml"})
    assert len(files) >= 15, files
    problems = [
        f"{path.relative_to(ROOT)}:{p.line}:{p.column}: {p.level}: {p.desc} ({p.rule})"
        for path in files
        for p in linter.run(path.read_text(encoding="utf-8"), config, str(path))
    ]
    assert not problems, "\n".join(problems)


# --- Kubernetes ----------------------------------------------------------------------------


def test_every_manifest_is_used_by_a_kustomization() -> None:
    used: set[Path] = set()
    for kust_path in K8S.rglob("kustomization.yaml"):
        kust = load_yaml(kust_path)
        used.add(kust_path)
        for ref in kust.get("resources", []) + [p["path"] for p in kust.get("patches", [])]:
            path = (kust_path.parent / ref).resolve()
            assert path.exists(), f"{kust_path.relative_to(ROOT)} refers to missing {ref}"
            used.add(path / "kustomization.yaml" if path.is_dir() else path)
    examples = set(K8S.rglob("*.example.yaml"))
    unused = set(K8S.rglob("*.yaml")) - used - examples
    assert not unused, f"not referenced by any kustomization: {sorted(map(str, unused))}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", ["base", "gpu"])
def test_kubeconform(
    deploy_tools: Tools, manifests: dict[str, str], overlay: str, version: str
) -> None:
    examples = [p.read_text(encoding="utf-8") for p in sorted(K8S.rglob("*.example.yaml"))]
    stream = "\n---\n".join([manifests[overlay], *examples])
    result = deploy_tools.validate(stream, version)
    assert result.ok, "\n".join(result.problems) or result.output
    docs = parse_docs(stream)
    assert result.summary == {"valid": len(docs), "invalid": 0, "errors": 0, "skipped": 0}
    expected = {"Namespace", "ConfigMap", "Secret", "Deployment", "Service", "ScaledObject"}
    assert expected | {"PodDisruptionBudget"} <= {d["kind"] for d in docs}


def _set(doc: Doc, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for key in parents:
        doc = doc[int(key)] if isinstance(doc, list) else doc[key]
    doc[last] = value


@pytest.mark.parametrize(
    ("kind", "path", "value", "says"),
    [
        ("Deployment", "spec.template.spec.containers.0.readinessProbes", {}, "readinessProbes"),
        ("Deployment", "spec.replicas", "2", "replicas"),
        ("ScaledObject", "spec.maxReplicas", 4, "maxReplicas"),
        # KEDA wants trigger metadata values as strings.
        ("ScaledObject", "spec.triggers.0.metadata.lagThreshold", 5000, "lagThreshold"),
        ("ScaledObject", "specs", {}, "specs"),
        ("ScaledObject", "apiVersion", "keda.sh/v1alpha2", "could not find schema"),
    ],
)
def test_kubeconform_catches_a_broken_object(
    deploy_tools: Tools, base_docs: list[Doc], kind: str, path: str, value: Any, says: str
) -> None:
    docs = copy.deepcopy(base_docs)
    _set(one(docs, kind), path, value)
    result = deploy_tools.validate(yaml.safe_dump_all(docs), K8S_VERSIONS[-1])
    assert not result.ok
    (problem,) = result.problems
    assert problem.startswith(f"{kind}/") and says in problem, problem


def test_deployment_fits_the_topology_and_the_image(base_docs: list[Doc]) -> None:
    deployment = one(base_docs, "Deployment")
    pod = worker_pod(base_docs)
    container = worker_container(base_docs)
    topology = worker_topology(base_docs)

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == topology.worker.web_port
    assert topology.worker.web_host == "0.0.0.0"
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert "replicas" not in deployment["spec"], "the ScaledObject owns the replica count"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    # The image's CMD, and the topology where the image's default one is.
    assert container["args"] == json.loads(instruction_args("Dockerfile", "CMD")[-1])

    # Non-root, read-only root: the image's user, and writable mounts where the worker writes
    # (faust's data dir in the working directory; torch's cache in TMPDIR).
    user = instruction_args("Dockerfile", "USER")[-1].split(":")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == user[0]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    workdir = [a for i, a in final_stage("Dockerfile") if i == "WORKDIR"][-1]
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = {
        m["mountPath"]
        for m in container["volumeMounts"]
        if not m.get("readOnly") and "emptyDir" in volumes[m["name"]]
    }
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert {workdir, env.get("TMPDIR", "/tmp")} <= writable

    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    assert "memory" in container["resources"]["limits"]


def _drain_bound_s() -> float:
    """The longest a SIGTERM drain takes: the source's stop (it waits for the batches in
    flight to be delivered, then commits) and then the publisher's close (it flushes)."""
    stop = inspect.signature(BatchSource.stop).parameters["timeout_s"].default
    close = inspect.signature(Publisher.close).parameters["timeout_s"].default
    return float(stop) + float(close)


def test_termination_grace_outlasts_the_drain(
    base_docs: list[Doc], compose: dict[str, Any]
) -> None:
    assert worker_pod(base_docs)["terminationGracePeriodSeconds"] > _drain_bound_s()
    for name, service in compose["services"].items():
        if name.startswith("worker"):
            grace = service["stop_grace_period"]
            assert grace.endswith("s")
            assert float(grace[:-1]) > _drain_bound_s(), name


def test_service_pdb_and_namespace(base_docs: list[Doc]) -> None:
    deployment = one(base_docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()

    service = one(base_docs, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http"
    annotations = service["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(worker_topology(base_docs).worker.web_port)
    assert annotations["prometheus.io/path"] == "/metrics"

    pdb = one(base_docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"].get("maxUnavailable") == 1

    namespaces = {d["metadata"].get("namespace") for d in base_docs if d["kind"] != "Namespace"}
    assert namespaces == {one(base_docs, "Namespace")["metadata"]["name"]}


def test_gpu_overlay(base_docs: list[Doc], gpu_docs: list[Doc]) -> None:
    pod = worker_pod(gpu_docs)
    container = worker_container(gpu_docs)
    # kustomize applies a patch whose target matches nothing without a word.
    assert "nvidia.com/gpu" in container["resources"]["limits"], "the GPU patch did not apply"
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert pod["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert {"name": "STREAM_INFER_DEVICE", "value": "cuda"} in container["env"]
    assert worker_topology(gpu_docs).device == "cuda"
    base = worker_container(base_docs)
    name, tag = split_image(base["image"])
    assert split_image(container["image"]) == (name, f"{tag}-cuda")
    for key in ("readinessProbe", "livenessProbe", "securityContext", "volumeMounts", "args"):
        assert container[key] == base[key], key


def test_secret_example_is_a_placeholder(base_docs: list[Doc]) -> None:
    (path,) = K8S.rglob("secret*.example.yaml")
    secret = load_yaml(path)
    assert secret["kind"] == "Secret"
    assert "NOT APPLIED" in path.read_text(encoding="utf-8")
    for key, value in secret["stringData"].items():
        assert key.startswith("STREAM_INFER_"), key
        assert "PLACEHOLDER" in value, key
    refs = [s["secretRef"] for s in worker_container(base_docs)["envFrom"] if "secretRef" in s]
    assert refs == [{"name": secret["metadata"]["name"], "optional": True}]


# --- KEDA ----------------------------------------------------------------------------------


def test_scaledobject_hpa_behaviour_is_valid(deploy_tools: Tools, base_docs: list[Doc]) -> None:
    """KEDA hands spec.advanced.horizontalPodAutoscalerConfig.behavior to the HPA it creates:
    validate that HPA."""
    spec = one(base_docs, "ScaledObject")["spec"]
    deployment = one(base_docs, "Deployment")
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": f"keda-hpa-{spec['scaleTargetRef']['name']}"},
        "spec": {
            "scaleTargetRef": {
                "apiVersion": deployment["apiVersion"],
                "kind": deployment["kind"],
                "name": spec["scaleTargetRef"]["name"],
            },
            "minReplicas": spec["minReplicaCount"],
            "maxReplicas": spec["maxReplicaCount"],
            "behavior": spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"],
        },
    }
    for version in K8S_VERSIONS:
        result = deploy_tools.validate(yaml.safe_dump(hpa), version)
        assert result.ok, "\n".join(result.problems) or result.output
        assert result.summary["valid"] == 1


def test_scaledobject_fits_the_topology(base_docs: list[Doc]) -> None:
    scaled = one(base_docs, "ScaledObject")
    spec = scaled["spec"]
    topology = worker_topology(base_docs)
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["kind"] == "ScaledObject"
    assert spec["scaleTargetRef"]["name"] == one(base_docs, "Deployment")["metadata"]["name"]
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    # More workers than partitions sit idle: never scale past the input topic's partitions.
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= topology.topics.partitions
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["consumerGroup"] == topology.group_id
    assert meta["topic"] == topology.topics.input
    assert meta["bootstrapServers"] == topology.kafka.bootstrap_servers
    assert meta.get("allowIdleConsumers", "false") == "false"
    assert int(meta["lagThreshold"]) > 0


# --- Topologies ----------------------------------------------------------------------------


def _deploy_topologies(base_docs: list[Doc]) -> Iterator[tuple[str, Topology]]:
    yield "deploy/topology.yaml", load_topology(DEPLOY / "topology.yaml", env={})
    yield "the ConfigMap", worker_topology(base_docs)


def _portable(topology: Topology) -> dict[str, Any]:
    """A topology without what a deployment adapts: where Kafka is and how to reach it, the
    web endpoint's address, the device, the replication factor (the cluster's business) and
    the model folders' location."""
    data = topology.model_dump(mode="json", exclude={"kafka", "worker", "device"})
    del data["topics"]["replication_factor"]
    for model in data["models"]:
        for version in model["versions"]:
            del version["path"]
    return data


def test_deploy_topologies_match_the_original(base_docs: list[Doc]) -> None:
    original = load_topology(ORIGINAL_TOPOLOGY, env={})
    root_in_image = Path(image_root())
    for where, topology in _deploy_topologies(base_docs):
        assert _portable(topology) == _portable(original), f"{where} differs from the original"
        assert topology.worker.web_host == "0.0.0.0", where
        assert topology.worker.web_port == original.worker.web_port, where
        assert topology.group_id == original.group_id, where
        for model, ours in zip(original.models, topology.models, strict=True):
            for version, mine in zip(model.versions, ours.versions, strict=True):
                # The image's copy of the same model folder.
                in_repo = version.path.relative_to(ROOT)
                assert mine.path == root_in_image / in_repo, where
                assert (ROOT / in_repo / "meta.json").is_file(), where


def test_compose_topology_points_at_the_compose_kafka(compose: dict[str, Any]) -> None:
    topology = load_topology(DEPLOY / "topology.yaml", env={})
    host = topology.kafka.bootstrap_servers.split(":")[0]
    assert host in compose["services"]
