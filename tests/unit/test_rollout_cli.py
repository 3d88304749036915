"""``stream-infer rollout``: a bad plan, or a topology that joins no labels, is refused before
anything is sent (exit 2, one message)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stream_infer.cli import main

ROOT = Path(__file__).resolve().parents[2]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
        raise SystemExit(0)
    return int(exit_info.value.code or 0), capsys.readouterr().err


def topology(tmp_path: Path, **changes: object) -> Path:
    doc = yaml.safe_load((ROOT / "topologies" / "phishing.yaml").read_text())
    doc.update(changes)
    for model in doc["models"]:
        for version in model["versions"]:
            version["path"] = str((ROOT / "topologies" / version["path"]).resolve())
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--steps", "0.5,0.2"], "step weights must increase"),
        (["--steps", "0,x"], "--steps"),
        (["--confidence", "1.5"], "confidence"),
        (["--margin", "-1"], "margin"),
        (["--min-labels", "0"], "min_labels"),
        (["--max-duration", "soon"], "--max-duration"),
    ],
)
def test_a_bad_plan_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    path = topology(tmp_path, online={"rollouts": True})
    code, err = run(capsys, "rollout", str(path), "--model", "risk", "--candidate", "v2", *args)
    assert code == 2 and needle in err, err


def test_a_topology_that_joins_no_labels_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = topology(tmp_path)  # no online section: labels are never joined
    code, err = run(capsys, "rollout", str(path), "--model", "risk", "--candidate", "v2")
    assert code == 2 and "online.rollouts" in err, err


def test_a_candidate_is_needed_unless_resuming(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = topology(tmp_path, online={"rollouts": True})
    code, err = run(capsys, "rollout", str(path), "--model", "risk")
    assert code == 2 and "--candidate" in err, err


def test_a_shadow_step_is_refused_where_the_topology_scores_no_shadow(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A weight-0 first step shadows the candidate, and a topology without topics.shadow never
    scores a shadow. The CLI checks it, not the routing table: what a table applies may not
    depend on a worker's own topology (two differ during a rolling deploy)."""
    doc = yaml.safe_load((ROOT / "topologies" / "phishing.yaml").read_text())
    topics = {k: v for k, v in doc["topics"].items() if k != "shadow"}
    path = topology(tmp_path, online={"rollouts": True}, topics=topics)
    args = ("--model", "risk", "--candidate", "v2", "--steps", "0,0.5,1")
    code, err = run(capsys, "rollout", str(path), *args)
    assert code == 2 and "topics.shadow" in err, err
    shadowed = topology(tmp_path, online={"rollouts": True})
    code, err = run(capsys, "rollout", str(shadowed), *args)
    assert "topics.shadow" not in err, err
