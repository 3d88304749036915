"""The command line's promises for bad input: one clear message, exit code 2, no traceback."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream_infer.cli import main

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Run the CLI in-process, the way the console script does; return code and output."""
    monkeypatch.chdir(ROOT)

    def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        with pytest.raises(SystemExit) as exit_info:
            main(list(args))
            raise SystemExit(0)
        out = capsys.readouterr()
        return Result(int(exit_info.value.code or 0), out.out, out.err)

    return invoke


def _topology(tmp_path: Path, **changes: object) -> Path:
    doc = yaml.safe_load((ROOT / "topologies" / "phishing.yaml").read_text())
    doc.update(changes)
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"batching": {"max_batch_size": 0}}, "batching.max_batch_size"),
        ({"device": "tpu"}, "device"),
        ({"topics": {"input": "bad topic!"}}, "topics"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_an_invalid_topology_is_one_message_and_exit_2(
    run: Any, tmp_path: Path, changes: dict[str, object], needle: str
) -> None:
    result = run("worker", str(_topology(tmp_path, **changes)))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert needle in result.stderr
    assert result.stderr.startswith("error: ")


def test_a_missing_or_non_yaml_file_is_exit_2(run: Any, tmp_path: Path) -> None:
    missing = run("worker", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    result = run("worker", str(bad))
    assert result.returncode == 2 and "not valid YAML" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_arguments_are_exit_2(run: Any) -> None:
    result = run("produce", "topologies/phishing.yaml", "--rate", "-5")
    assert result.returncode == 2
    assert "--rate" in result.stderr and "Traceback" not in result.stderr
    assert run("no-such-command").returncode == 2


def test_an_unreachable_broker_is_exit_1_with_where_it_looked(run: Any) -> None:
    env = {
        "STREAM_INFER_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1",
        "STREAM_INFER_KAFKA__CONNECT_TIMEOUT_S": "1",
    }
    result = run("worker", "topologies/phishing.yaml", env=env)
    assert result.returncode == 1
    assert "cannot reach Kafka at 127.0.0.1:1" in result.stderr
    assert "Traceback" not in result.stderr
