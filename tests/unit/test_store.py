"""The model store: round trips in both formats, and every way an artifact is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from stream_infer.errors import IntegrityError, ModelError
from stream_infer.examples.phishing import RiskMLP
from stream_infer.inference.store import (
    META_FILE,
    ModelMeta,
    load_artifact,
    save_export,
    save_state_dict,
    sha256_file,
)

FEATURES = ("a", "b", "c")
MODULE_CLASS = "stream_infer.examples.phishing:RiskMLP"


def tiny_mlp(seed: int) -> RiskMLP:
    torch.manual_seed(seed)
    return RiskMLP(n_features=len(FEATURES), hidden=4).eval()


def inputs(n: int) -> torch.Tensor:
    return torch.randn(n, len(FEATURES), generator=torch.Generator().manual_seed(n))


@pytest.fixture(scope="module")
def original() -> RiskMLP:
    return tiny_mlp(seed=3)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory, original: RiskMLP) -> Path:
    """Exported once for the module: torch.export takes seconds."""
    directory = tmp_path_factory.mktemp("export") / "v1"
    save_export(original, directory, features=FEATURES, output="logit", description="tiny")
    return directory


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory, original: RiskMLP) -> Path:
    directory = tmp_path_factory.mktemp("state") / "v2"
    save_state_dict(
        original,
        directory,
        module_class=MODULE_CLASS,
        module_kwargs={"n_features": len(FEATURES), "hidden": 4},
        features=FEATURES,
        output="logit",
    )
    return directory


@pytest.fixture(params=["export", "state_dict"])
def artifact_dir(
    request: pytest.FixtureRequest, export_dir: Path, state_dir: Path, tmp_path: Path
) -> Path:
    """A private copy of one saved version, free to be damaged."""
    source = export_dir if request.param == "export" else state_dir
    return Path(shutil.copytree(source, tmp_path / "copy"))


def edit_meta(directory: Path, **changes: Any) -> None:
    path = directory / META_FILE
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc.update(changes)
    path.write_text(json.dumps(doc), encoding="utf-8")


def refusal(directory: Path, features: tuple[str, ...] = FEATURES, **kw: Any) -> ModelError:
    with pytest.raises(ModelError) as info:
        load_artifact(directory, features=features, **kw)
    return info.value


# --- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 300])
def test_an_export_round_trips_at_any_batch_size(
    export_dir: Path, original: RiskMLP, n: int
) -> None:
    meta, module = load_artifact(export_dir, features=FEATURES)
    assert meta.format == "export"
    assert meta.artifact == "model.pt2"
    x = inputs(n)
    with torch.inference_mode():
        torch.testing.assert_close(module(x), original(x), rtol=0, atol=1e-6)


def test_a_state_dict_round_trips(state_dir: Path, original: RiskMLP) -> None:
    meta, module = load_artifact(state_dir, features=FEATURES)
    assert meta.format == "state_dict"
    assert meta.module == MODULE_CLASS
    assert meta.module_kwargs == {"n_features": 3, "hidden": 4}
    assert isinstance(module, RiskMLP)
    assert not module.training
    x = inputs(50)
    with torch.inference_mode():
        torch.testing.assert_close(module(x), original(x), rtol=0, atol=1e-6)


def test_a_different_model_gives_different_outputs(state_dir: Path) -> None:
    """The round trips above compare against something that can differ."""
    _, module = load_artifact(state_dir, features=FEATURES)
    x = inputs(50)
    with torch.inference_mode():
        assert not torch.allclose(module(x), tiny_mlp(seed=4)(x), atol=1e-3)


def test_meta_records_what_was_saved(export_dir: Path) -> None:
    meta = ModelMeta.read(export_dir)
    assert meta.sha256 == sha256_file(export_dir / meta.artifact)
    assert len(meta.sha256) == 64
    assert meta.features == FEATURES
    assert meta.output == "logit"
    assert meta.description == "tiny"


def test_meta_write_and_read_round_trip(tmp_path: Path) -> None:
    meta = ModelMeta(
        format="state_dict",
        artifact="w.pt",
        sha256="0" * 64,
        features=FEATURES,
        output="regression",
        module="pkg.mod:Cls",
        module_kwargs={"hidden": 8},
        description="d",
    )
    meta.write(tmp_path)
    assert ModelMeta.read(tmp_path) == meta


# --- refusals -------------------------------------------------------------------------------


def test_a_tampered_artifact_is_refused(artifact_dir: Path) -> None:
    artifact = artifact_dir / ModelMeta.read(artifact_dir).artifact
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x01
    artifact.write_bytes(bytes(data))

    error = refusal(artifact_dir, model="risk", version="v1")

    assert isinstance(error, IntegrityError)
    assert (error.model, error.version) == ("risk", "v1")
    assert str(error).startswith("model 'risk' version 'v1': sha256 of ")
    assert "refusing it" in str(error)


def test_a_feature_order_that_differs_is_refused(artifact_dir: Path) -> None:
    error = refusal(artifact_dir, features=("c", "b", "a"))
    assert "trained on 3 features ['a', 'b', 'c'], the topology declares 3 ['c', 'b', 'a']" in str(
        error
    )


def test_a_feature_count_that_differs_is_refused(artifact_dir: Path) -> None:
    error = refusal(artifact_dir, features=(*FEATURES, "d"))
    assert "trained on 3 features" in str(error)
    assert "the topology declares 4" in str(error)


def test_a_missing_artifact_is_refused(artifact_dir: Path) -> None:
    (artifact_dir / ModelMeta.read(artifact_dir).artifact).unlink()
    assert "does not exist" in str(refusal(artifact_dir))


def test_a_missing_meta_is_refused(artifact_dir: Path) -> None:
    (artifact_dir / META_FILE).unlink()
    assert "cannot read" in str(refusal(artifact_dir))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{not json", "cannot read"),
        ("[1, 2]", "expected a JSON object"),
        ('{"format": "export"}', "missing or malformed field 'artifact'"),
        ('{"format": "export", "artifact": "m", "sha256": "x", "features": 5}', "malformed"),
    ],
)
def test_malformed_meta_is_refused(artifact_dir: Path, text: str, fragment: str) -> None:
    (artifact_dir / META_FILE).write_text(text, encoding="utf-8")
    assert fragment in str(refusal(artifact_dir))


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"format": "onnx"}, "unknown format 'onnx'"),
        ({"format": "pickle"}, "unknown format 'pickle'"),
        ({"output": "softmax"}, "unknown output kind 'softmax'"),
        ({"format": "state_dict", "module": None}, "a state_dict artifact needs 'module'"),
        ({"artifact": "../model.pt"}, "the artifact must be a file name in the same directory"),
        ({"artifact": "sub/model.pt"}, "the artifact must be a file name in the same directory"),
        ({"artifact": ".hidden"}, "the artifact must be a file name in the same directory"),
    ],
)
def test_meta_that_cannot_be_used_is_refused(
    artifact_dir: Path, changes: dict[str, Any], fragment: str
) -> None:
    edit_meta(artifact_dir, **changes)
    assert fragment in str(refusal(artifact_dir))


@pytest.mark.parametrize(
    ("module", "fragment"),
    [
        ("collections:OrderedDict", "'collections:OrderedDict' is not a torch.nn.Module subclass"),
        ("json:dumps", "'json:dumps' is not a torch.nn.Module subclass"),
        ("no_such_package.mod:Net", "cannot import module class 'no_such_package.mod:Net'"),
        ("stream_infer.examples.phishing:Nope", "cannot import module class"),
        ("stream_infer.examples.phishing", "cannot import module class"),
    ],
)
def test_a_state_dict_module_that_is_not_a_module_is_refused(
    state_dir: Path, tmp_path: Path, module: str, fragment: str
) -> None:
    directory = Path(shutil.copytree(state_dir, tmp_path / "v"))
    edit_meta(directory, module=module)
    assert fragment in str(refusal(directory))


def test_state_dict_kwargs_that_do_not_fit_the_weights_are_refused(
    state_dir: Path, tmp_path: Path
) -> None:
    directory = Path(shutil.copytree(state_dir, tmp_path / "v"))
    edit_meta(directory, module_kwargs={"n_features": 3, "hidden": 8})
    assert "cannot load" in str(refusal(directory))


def test_a_corrupt_artifact_with_a_matching_hash_is_refused(artifact_dir: Path) -> None:
    meta = ModelMeta.read(artifact_dir)
    artifact = artifact_dir / meta.artifact
    artifact.write_bytes(b"this is not a model")
    edit_meta(artifact_dir, sha256=sha256_file(artifact))
    assert f"cannot load {artifact} as {meta.format}: " in str(refusal(artifact_dir))


class Payload:
    """Unpickling this runs code: it touches a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_a_pickled_object_in_a_state_dict_is_never_run(state_dir: Path, tmp_path: Path) -> None:
    directory = Path(shutil.copytree(state_dir, tmp_path / "v"))
    marker = tmp_path / "pwned"
    artifact = directory / "model.pt"
    state = torch.load(artifact, weights_only=True)
    state["net.0.weight"] = Payload(marker)
    torch.save(state, artifact)
    edit_meta(directory, sha256=sha256_file(artifact))

    error = refusal(directory)

    assert f"cannot load {artifact} as state_dict: UnpicklingError" in str(error)
    assert not marker.exists()
    # The payload is live: a loader that unpickled it would have run it.
    torch.load(artifact, weights_only=False)
    assert marker.exists()
