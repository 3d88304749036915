"""Offline checks of a topology against what it names: run before anything connects.

``stream-infer validate`` runs them all and refuses on any. ``worker`` and ``topics`` run
them first (without loading the artifacts into torch) and refuse what is wrong with the
topology itself (features that differ from an artifact's), so a typo is one message and exit
code 2, not a worker that starts and crashes. What is wrong with this node's files (an
artifact missing, corrupt or unloadable) they only log: a worker handles that at run time
(that version is not loaded, the worker stays not-ready while the control log routes it and
retries; a version the log no longer routes needs no file), so that one node's missing file
never stops a worker that does not need it. What is checked, beyond the schema
(:mod:`stream_infer.settings`):

* each model version's directory: its ``meta.json``, the artifact it names, the artifact's
  sha256 against the one ``meta.json`` declares;
* the topology's features against the ones each artifact was trained on (names and order),
  naming the names that differ;
* (the online policies against the learners and monitors are part of the schema:
  ``Topology._policy_problem``);
* with ``load``: each artifact loads (torch.export program or state_dict into its module).
"""

from __future__ import annotations

from stream_infer.errors import ConfigError, ModelError
from stream_infer.settings import ModelSettings, Topology, VersionSettings


def topology_problems(topology: Topology, *, load: bool = False, files: bool = True) -> list[str]:
    """Everything wrong with the topology that can be seen offline, one line each; with
    ``files=False`` only what is wrong with the topology itself (not with this node's
    files)."""
    problems: list[str] = []
    for model in topology.models:
        for version in model.versions:
            problem, of_files = _version_problem(topology, model, version, load=load)
            if problem and (files or not of_files):
                problems.append(problem)
    return problems


def file_problems(topology: Topology) -> list[str]:
    """What is wrong with this node's artifact files (not with the topology), one line each."""
    out = []
    for model in topology.models:
        for version in model.versions:
            problem, of_files = _version_problem(topology, model, version, load=False)
            if problem and of_files:
                out.append(problem)
    return out


def check_topology(
    topology: Topology, *, source: str | None = None, load: bool = False, files: bool = True
) -> None:
    """Raise one :class:`ConfigError` listing every problem :func:`topology_problems` finds
    (with ``files=False``, only those of the topology itself)."""
    problems = topology_problems(topology, load=load, files=files)
    if problems:  # the first on the message's first line, any others below it
        raise ConfigError("\n  ".join(problems), source=source)


def _version_problem(
    topology: Topology, model: ModelSettings, version: VersionSettings, *, load: bool
) -> tuple[str | None, bool]:
    """What is wrong with one version, and whether it is this node's files (not the
    topology)."""
    # Imported here: torch is heavy, and the settings must not need it.
    from stream_infer.inference.store import ModelMeta, load_artifact, sha256_file

    where = f"model {model.name!r} version {version.version!r}"
    try:
        meta = ModelMeta.read(version.path)
    except ModelError as exc:
        return f"{where}: {exc}", True
    features = topology.features
    if meta.features != features:
        return f"{where}: {_feature_difference(features, meta.features)}", False
    artifact = version.path / meta.artifact
    if not artifact.is_file():
        return f"{where}: artifact {artifact} does not exist", True
    actual = sha256_file(artifact)
    if actual != meta.sha256:
        msg = f"{where}: sha256 of {artifact} is {actual}, its meta.json says {meta.sha256}"
        return msg, True
    if load:
        try:
            load_artifact(version.path, features=features)
        except ModelError as exc:
            return f"{where}: {exc}", True
    return None, False


def _feature_difference(topology: tuple[str, ...], artifact: tuple[str, ...]) -> str:
    unknown = [f for f in topology if f not in artifact]
    lacking = [f for f in artifact if f not in topology]
    if not unknown and not lacking:
        return (
            f"the topology lists the artifact's features in another order: {list(topology)}; "
            f"the artifact was trained on {list(artifact)}"
        )
    parts = []
    if unknown:
        parts.append(f"the topology's features {unknown} are not the artifact's")
    if lacking:
        parts.append(f"the artifact's features {lacking} are not in the topology")
    return "; ".join(parts) + " (features must name the artifact's, in its order)"
