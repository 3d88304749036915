"""Offline checks of a topology against what it names: run before anything connects.

``stream-infer validate`` runs them all; ``worker`` and ``topics`` run them first (without
loading the artifacts into torch), so a topology that cannot serve is one message and exit
code 2, not a worker that starts and crashes. What is checked, beyond the schema
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


def topology_problems(topology: Topology, *, load: bool = False) -> list[str]:
    """Everything wrong with the topology that can be seen offline, one line each."""
    problems: list[str] = []
    for model in topology.models:
        for version in model.versions:
            problem = _version_problem(topology, model, version, load=load)
            if problem:
                problems.append(problem)
    return problems


def check_topology(topology: Topology, *, source: str | None = None, load: bool = False) -> None:
    """Raise one :class:`ConfigError` listing every problem :func:`topology_problems` finds."""
    problems = topology_problems(topology, load=load)
    if problems:  # the first on the message's first line, any others below it
        raise ConfigError("\n  ".join(problems), source=source)


def _version_problem(
    topology: Topology, model: ModelSettings, version: VersionSettings, *, load: bool
) -> str | None:
    # Imported here: torch is heavy, and the settings must not need it.
    from stream_infer.inference.store import ModelMeta, load_artifact, sha256_file

    where = f"model {model.name!r} version {version.version!r}"
    try:
        meta = ModelMeta.read(version.path)
    except ModelError as exc:
        return f"{where}: {exc}"
    features = topology.features
    if meta.features != features:
        return f"{where}: {_feature_difference(features, meta.features)}"
    artifact = version.path / meta.artifact
    if not artifact.is_file():
        return f"{where}: artifact {artifact} does not exist"
    actual = sha256_file(artifact)
    if actual != meta.sha256:
        return f"{where}: sha256 of {artifact} is {actual}, its meta.json says {meta.sha256}"
    if load:
        try:
            load_artifact(version.path, features=features)
        except ModelError as exc:
            return f"{where}: {exc}"
    return None


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
