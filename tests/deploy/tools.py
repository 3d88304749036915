"""The real tools that render and validate deploy/k8s, installed with Go on first use and kept
under ``~/.cache/stream-infer/go-bin`` (one folder per version), so later runs start at once:

- kustomize (``sigs.k8s.io/kustomize/kustomize/v5``) renders the kustomizations;
- kubeconform (``github.com/yannh/kubeconform``) validates the rendered objects, strict.

Nothing is fetched at test time but Go modules (from the Go module proxy, by ``go``):
kubeconform reads its schemas from files made here, never from its default URL. They are made
anew in a folder of the caller's for each run (a fraction of a second), so never stale:

- Kubernetes' kinds: the JSON schemas kubernetes-validate ships (a dev dependency), one folder
  per Kubernetes version. Their ``$ref`` point at a shared ``_definitions.json`` by a URL that
  kubeconform would try to download, so each kind's schema is bundled here into one file with
  the definitions it reaches (``standalone``, as kubeconform's own schema folders are).
- KEDA's ScaledObject: the CRD that KEDA itself installs (``config/crd/bases`` in the
  ``github.com/kedacore/keda/v2`` module), its openAPIV3Schema made strict the way
  kubeconform's openapi2jsonschema.py does it (objects with declared properties take no
  others), at the root too. The CRD's CEL rules (``x-kubernetes-validations``) are not checked.

Run as a script (``python -m tests.deploy.tools``) it installs the tools and says how long it
took.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.rendered import Doc, parse_docs

CACHE = Path.home() / ".cache" / "stream-infer"
GO_INSTALL_TIMEOUT_S = 1200.0
TOOL_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class GoTool:
    """A command that ``go install package@version`` builds."""

    package: str
    version: str
    name: str

    @property
    def path(self) -> Path:
        return CACHE / "go-bin" / f"{self.name}-{self.version}" / self.name


# Pinned: the newest releases whose go.mod asks for no newer Go than 1.26 (kustomize v5.8.3
# and its api v0.21.3 need Go 1.27).
KUSTOMIZE = GoTool("sigs.k8s.io/kustomize/kustomize/v5", "v5.8.2", "kustomize")
KUBECONFORM = GoTool("github.com/yannh/kubeconform/cmd/kubeconform", "v0.8.0", "kubeconform")
# KEDA's CRDs, as the release installs them; the one deploy/k8s uses.
KEDA_MODULE, KEDA_VERSION = "github.com/kedacore/keda/v2", "v2.21.0"
KEDA_CRD = "config/crd/bases/keda.sh_scaledobjects.yaml"


class GoMissingError(RuntimeError):
    """No ``go`` command: the tools cannot be built (the tests that need them skip)."""


class ToolError(RuntimeError):
    """A tool ran and failed; the message holds its command and its stderr."""


def _run(
    cmd: list[str],
    *,
    stdin: str | None = None,
    timeout_s: float = TOOL_TIMEOUT_S,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        cmd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        cwd=cwd,
        check=False,
    )
    if check and proc.returncode != 0:
        msg = f"`{' '.join(cmd)}` exited {proc.returncode}:\n{proc.stderr}{proc.stdout}"
        raise ToolError(msg)
    return proc


def go_command() -> str:
    """``go`` on PATH, else Go's default install folder."""
    found = shutil.which("go") or shutil.which("/usr/local/go/bin/go")
    if found is None:
        msg = (
            "Go is not installed (no `go` on PATH nor /usr/local/go/bin/go): "
            "cannot build kustomize and kubeconform for the deploy/k8s checks"
        )
        raise GoMissingError(msg)
    return found


def go_install(go: str, tool: GoTool) -> Path:
    """``tool``'s binary, built the first time into a temporary GOBIN and moved into place,
    so that a run stopped half-way, or two runs at once, never leave a broken one."""
    if tool.path.is_file():
        return tool.path
    tool.path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tool.path.parent) as gobin:
        env = os.environ | {"GOBIN": gobin}
        _run(
            [go, "install", f"{tool.package}@{tool.version}"],
            env=env,
            cwd=Path(gobin),
            timeout_s=GO_INSTALL_TIMEOUT_S,
        )
        os.replace(Path(gobin) / tool.name, tool.path)
    return tool.path


def go_module_dir(go: str, module: str, version: str) -> Path:
    """The source of ``module@version`` in Go's module cache, downloaded if not there."""
    proc = _run(
        [go, "mod", "download", "-json", f"{module}@{version}"],
        cwd=CACHE,
        timeout_s=GO_INSTALL_TIMEOUT_S,
    )
    return Path(json.loads(proc.stdout)["Dir"])


def _write_json(path: Path, data: Any) -> None:
    """Write atomically: a reader sees the old file, none, or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)


# --- Kubernetes schemas --------------------------------------------------------------------

_DEFS_REF = "/api/_definitions.json#/$defs/"


def _refs(node: Any) -> Iterable[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _local_refs(node: Any) -> Any:
    """``node`` with ``/api/_definitions.json#/$defs/X`` refs made ``#/$defs/X``."""
    if isinstance(node, dict):
        return {
            k: (v.replace("/api/_definitions.json#", "#") if k == "$ref" else _local_refs(v))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_local_refs(v) for v in node]
    return node


def bundle_kind_schema(kind_schema: Doc, definitions: Doc) -> Doc:
    """One kind's schema with every definition it reaches copied into its ``$defs``."""
    defs: dict[str, Any] = {}
    pending = [r.removeprefix(_DEFS_REF) for r in _refs(kind_schema) if r.startswith(_DEFS_REF)]
    while pending:
        name = pending.pop()
        if name in defs:
            continue
        defs[name] = definitions["$defs"][name]
        pending += [r.removeprefix("#/$defs/") for r in _refs(defs[name])]
    bundled: Doc = _local_refs({k: v for k, v in kind_schema.items() if k != "$id"})
    bundled["$defs"] = defs
    return bundled


# The strict schemas kubernetes-validate ships: v<version>-local-strict/<kind>-<group>-<v>.json.
KUBERNETES_VALIDATE_SCHEMAS = Path(
    str(resources.files("kubernetes_validate") / "kubernetes-json-schema")
)


def kubernetes_versions() -> list[str]:
    """The Kubernetes versions kubernetes-validate has schemas of, oldest first."""
    return sorted(
        (
            p.name.removeprefix("v").removesuffix("-local-strict")
            for p in KUBERNETES_VALIDATE_SCHEMAS.glob("v*-local-strict")
        ),
        key=lambda v: tuple(int(x) for x in v.split(".")),
    )


class KubernetesSchemas:
    """kubeconform's schema folders for Kubernetes' kinds under ``root``, made from
    kubernetes-validate's, one kind at a time as the objects to validate need them."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def location(self) -> str:
        return str(
            self.root
            / "{{ .NormalizedKubernetesVersion }}-standalone{{ .StrictSuffix }}"
            / "{{ .ResourceKind }}{{ .KindSuffix }}.json"
        )

    def prepare(self, docs: Iterable[Doc], version: str) -> None:
        source = KUBERNETES_VALIDATE_SCHEMAS / f"v{version}-local-strict"
        if not source.is_dir():
            msg = f"kubernetes-validate has no schemas of Kubernetes {version}, only of: "
            msg += ", ".join(kubernetes_versions())
            raise ToolError(msg)
        definitions: Doc | None = None
        for doc in docs:
            group, _, api = doc["apiVersion"].rpartition("/")
            suffix = "-".join(p for p in (group.split(".")[0], api) if p)
            name = f"{doc['kind'].lower()}-{suffix}.json"
            target = self.root / f"v{version}-standalone-strict" / name
            if target.is_file() or not (source / name).is_file():
                continue  # done before, or not a Kubernetes kind (kubeconform says so)
            if definitions is None:
                definitions = json.loads((source / "_definitions.json").read_text("utf-8"))
            kind_schema = json.loads((source / name).read_text("utf-8"))
            _write_json(target, bundle_kind_schema(kind_schema, definitions))


# --- CRD schemas ---------------------------------------------------------------------------


def strict_openapi_schema(node: Any) -> Any:
    """A CRD's openAPIV3Schema as a JSON schema (draft 4, which OpenAPI 3.0's keywords follow)
    that rejects unknown fields: every object with declared properties takes no others, unless
    it preserves unknown fields; ``nullable`` allows null."""
    if isinstance(node, list):
        return [strict_openapi_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_openapi_schema(v) for k, v in node.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def crd_schemas(crd: Doc) -> dict[str, Doc]:
    """kubeconform's ``{{ .Group }}/{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json`` paths
    for each version a CRD serves, and their schemas."""
    spec = crd["spec"]
    out = {}
    for version in spec["versions"]:
        schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
        schema = strict_openapi_schema(schema)
        schema["$schema"] = "http://json-schema.org/draft-04/schema#"
        path = f"{spec['group']}/{spec['names']['kind'].lower()}_{version['name']}.json"
        out[path] = schema
    return out


def keda_schemas(go: str, root: Path) -> Path:
    """``root``, holding the schemas of KEDA's ScaledObject, made from its CRD."""
    source = go_module_dir(go, KEDA_MODULE, KEDA_VERSION)
    crd = yaml.safe_load((source / KEDA_CRD).read_text(encoding="utf-8"))
    for path, schema in crd_schemas(crd).items():
        _write_json(root / path, schema)
    return root


# --- Running the tools ---------------------------------------------------------------------


@dataclass(frozen=True)
class Validation:
    """What kubeconform said of one stream of objects."""

    returncode: int
    output: str
    summary: dict[str, int]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.problems


@dataclass(frozen=True)
class Tools:
    kustomize: Path
    kubeconform: Path
    kubernetes: KubernetesSchemas
    crds: Path

    def build(self, directory: Path) -> str:
        """``kustomize build DIRECTORY``: the objects as multi-document YAML."""
        return _run([str(self.kustomize), "build", str(directory)]).stdout

    def validate(self, manifests: str, version: str) -> Validation:
        """kubeconform, strict, on a multi-document YAML stream, for one Kubernetes version.
        A kind without a schema is an error, not a skip."""
        self.kubernetes.prepare(parse_docs(manifests), version)
        crd_location = self.crds / "{{ .Group }}/{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json"
        cmd = [
            str(self.kubeconform), "-strict", "-summary", "-output", "json",
            "-kubernetes-version", version,
            "-schema-location", self.kubernetes.location,
            "-schema-location", str(crd_location),
        ]  # fmt: skip
        proc = _run([*cmd, "-"], stdin=manifests, check=False)
        try:
            report = json.loads(proc.stdout)
        except ValueError as exc:
            msg = f"kubeconform printed no report (exit {proc.returncode}):\n{proc.stderr}"
            raise ToolError(msg) from exc
        problems = [
            f"{r['kind']}/{r['name']} ({r['version']}): {r['status']}: {r['msg']}"
            for r in report["resources"]
            if r["status"] != "statusValid"
        ]
        return Validation(proc.returncode, proc.stdout + proc.stderr, report["summary"], problems)


def install(schemas: Path) -> Tools:
    """The tools, installed if not yet there, with their schemas made under ``schemas`` (an
    empty folder). Raises GoMissingError without Go, ToolError when an install fails."""
    go = go_command()
    CACHE.mkdir(parents=True, exist_ok=True)
    return Tools(
        kustomize=go_install(go, KUSTOMIZE),
        kubeconform=go_install(go, KUBECONFORM),
        kubernetes=KubernetesSchemas(schemas / "kubernetes"),
        crds=keda_schemas(go, schemas / "crds"),
    )


if __name__ == "__main__":
    import time

    started = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        tools = install(Path(folder))
    print(f"{tools.kustomize}\n{tools.kubeconform}\nin {time.monotonic() - started:.1f} s")
