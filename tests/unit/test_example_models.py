"""`build-example-models` is byte-reproducible (issue 18 item 9): the tracked artifacts are what
it writes, so running it with its default --out leaves the checkout clean."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from stream_infer.examples import phishing

ROOT = Path(__file__).resolve().parents[2]
TRACKED = ROOT / "models" / "phishing"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models")
    phishing.build(out)
    return out


def _torch_version(archive: Path) -> str:
    with zipfile.ZipFile(archive) as z:
        doc = json.loads(z.read("model/models/model.json"))
    return str(doc["torch_version"])


def test_the_export_holds_no_source_lines_or_paths(built: Path) -> None:
    with zipfile.ZipFile(built / "risk" / "v1" / "model.pt2") as z:
        text = b"".join(z.read(n) for n in z.namelist())
    assert b"stack_trace" not in text
    assert str(ROOT).encode() not in text and b"site-packages" not in text


def test_the_build_is_the_tracked_artifacts_byte_for_byte(built: Path) -> None:
    tracked_torch = _torch_version(TRACKED / "risk" / "v1" / "model.pt2")
    if tracked_torch != torch.__version__:
        pytest.skip(
            f"the tracked artifacts were built with torch {tracked_torch}, this is "
            f"{torch.__version__} (torch.export records its version)"
        )
    files = sorted(p.relative_to(TRACKED) for p in TRACKED.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(built) for p in built.rglob("*") if p.is_file())
    for name in files:
        assert (built / name).read_bytes() == (TRACKED / name).read_bytes(), name
