"""The model store: versions on disk, each a directory with ``meta.json`` and an artifact.

Formats:
  * ``export``: a ``torch.export`` program (``.pt2``) with a dynamic batch dimension;
  * ``state_dict``: tensors only, loaded with ``torch.load(weights_only=True)`` into a module
    class that the metadata names (``package.module:Class``) and builds with ``module_kwargs``.

Nothing is ever unpickled: both loaders refuse arbitrary Python objects. The artifact's sha256
is checked against the metadata before a single byte is handed to torch.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from stream_infer.errors import IntegrityError, ModelError

Format = Literal["export", "state_dict"]
OutputKind = Literal["probability", "logit", "regression"]
META_FILE = "meta.json"


@dataclass(frozen=True)
class ModelMeta:
    """What a version's directory declares about its artifact."""

    format: Format
    artifact: str
    sha256: str
    features: tuple[str, ...]
    output: OutputKind = "probability"
    module: str | None = None
    module_kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @classmethod
    def read(cls, directory: Path) -> ModelMeta:
        path = directory / META_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            msg = f"cannot read {path}: {exc}"
            raise ModelError(msg) from None
        if not isinstance(raw, dict):
            raise ModelError(f"{path}: expected a JSON object")
        try:
            meta = cls(
                format=raw["format"],
                artifact=raw["artifact"],
                sha256=raw["sha256"],
                features=tuple(raw["features"]),
                output=raw.get("output", "probability"),
                module=raw.get("module"),
                module_kwargs=dict(raw.get("module_kwargs", {})),
                description=raw.get("description", ""),
            )
        except (KeyError, TypeError) as exc:
            msg = f"{path}: missing or malformed field {exc}"
            raise ModelError(msg) from None
        if meta.format not in ("export", "state_dict"):
            raise ModelError(f"{path}: unknown format {meta.format!r}")
        if meta.output not in ("probability", "logit", "regression"):
            raise ModelError(f"{path}: unknown output kind {meta.output!r}")
        if meta.format == "state_dict" and not meta.module:
            raise ModelError(f"{path}: a state_dict artifact needs 'module' (package.mod:Class)")
        if "/" in meta.artifact or meta.artifact.startswith("."):
            raise ModelError(f"{path}: the artifact must be a file name in the same directory")
        return meta

    def write(self, directory: Path) -> None:
        doc = asdict(self)
        doc["features"] = list(self.features)
        (directory / META_FILE).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _import_module_class(spec: str) -> type[torch.nn.Module]:
    mod_name, _, cls_name = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(mod_name), cls_name)
    except (ImportError, AttributeError, ValueError) as exc:
        msg = f"cannot import module class {spec!r}: {exc}"
        raise ModelError(msg) from None
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ModelError(f"{spec!r} is not a torch.nn.Module subclass")
    return cls


def load_artifact(
    directory: Path,
    *,
    features: tuple[str, ...],
    model: str | None = None,
    version: str | None = None,
) -> tuple[ModelMeta, torch.nn.Module]:
    """Verify and load one version on the CPU. Refuses a feature order that does not match."""
    try:
        meta = ModelMeta.read(directory)
        if meta.features != features:
            msg = (
                f"the artifact was trained on {len(meta.features)} features {list(meta.features)}, "
                f"the topology declares {len(features)} {list(features)}"
            )
            raise ModelError(msg)
        path = directory / meta.artifact
        if not path.is_file():
            raise ModelError(f"artifact {path} does not exist")
        actual = sha256_file(path)
        if actual != meta.sha256:
            msg = f"sha256 of {path} is {actual}, meta.json says {meta.sha256}; refusing it"
            raise IntegrityError(msg)
        module = _load(meta, path)
    except ModelError as exc:
        if model is None or exc.model is not None:
            raise
        raise type(exc)(str(exc), model=model, version=version) from None
    return meta, module


def _load(meta: ModelMeta, path: Path) -> torch.nn.Module:
    try:
        if meta.format == "export":
            return torch.export.load(str(path)).module()
        cls = _import_module_class(meta.module or "")
        module = cls(**meta.module_kwargs)
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        module.load_state_dict(state)
        return module.eval()
    except ModelError:
        raise
    except Exception as exc:  # torch raises many types for a corrupt or incompatible artifact
        msg = f"cannot load {path} as {meta.format}: {type(exc).__name__}: {exc}"
        raise ModelError(msg) from None


def save_export(
    module: torch.nn.Module,
    directory: Path,
    *,
    features: tuple[str, ...],
    output: OutputKind,
    description: str = "",
) -> ModelMeta:
    """Write a module as a torch.export artifact with a dynamic batch dimension."""
    directory.mkdir(parents=True, exist_ok=True)
    module.eval()
    example = (torch.zeros(2, len(features)),)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    program = torch.export.export(module, example, dynamic_shapes=({0: batch},))
    # Each node records the Python stack that made it (source lines, install paths): drop it,
    # so the same weights give the same bytes wherever and from whichever checkout it is built.
    for node in program.graph.nodes:
        node.meta.pop("stack_trace", None)
    artifact = directory / "model.pt2"
    torch.export.save(program, str(artifact))
    meta = ModelMeta(
        format="export",
        artifact=artifact.name,
        sha256=sha256_file(artifact),
        features=features,
        output=output,
        description=description,
    )
    meta.write(directory)
    return meta


def save_state_dict(
    module: torch.nn.Module,
    directory: Path,
    *,
    module_class: str,
    module_kwargs: dict[str, Any],
    features: tuple[str, ...],
    output: OutputKind,
    description: str = "",
) -> ModelMeta:
    """Write a module's tensors plus the class that rebuilds it."""
    directory.mkdir(parents=True, exist_ok=True)
    artifact = directory / "model.pt"
    torch.save(module.state_dict(), str(artifact))
    meta = ModelMeta(
        format="state_dict",
        artifact=artifact.name,
        sha256=sha256_file(artifact),
        features=features,
        output=output,
        module=module_class,
        module_kwargs=module_kwargs,
        description=description,
    )
    meta.write(directory)
    return meta
