"""The command line's promises for bad input: one clear message, exit code 2, no traceback."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

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


# --- issue 18: side paths -------------------------------------------------------------------

MODELS = ROOT / "models" / "phishing" / "risk"


def _with_models(tmp_path: Path, name: str = "phishing.yaml", **changes: object) -> Path:
    """A copy of a shipped topology in tmp_path, its model paths made absolute."""
    doc = yaml.safe_load((ROOT / "topologies" / name).read_text())
    for model in doc["models"]:
        for version in model["versions"]:
            version["path"] = str((ROOT / "topologies" / version["path"]).resolve())
    doc.update(changes)
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _typo_features() -> list[str]:
    from stream_infer.examples.phishing import FEATURES

    return [f if f != "ip_in_url" else "ip_in_uri" for f in FEATURES]


def test_validate_passes_the_shipped_topologies(run: Any) -> None:
    for name in ("phishing.yaml", "phishing-online.yaml"):
        result = run("validate", f"topologies/{name}")
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[0] == f"topologies/{name}: valid"


@pytest.mark.parametrize("command", ["validate", "topics", "worker"])
def test_a_feature_typo_is_one_message_naming_it_and_exit_2(
    run: Any, tmp_path: Path, command: str
) -> None:
    path = _with_models(tmp_path, features=_typo_features())
    # No broker anywhere: the check comes before any connection.
    env = {"STREAM_INFER_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    result = run(command, str(path), env=env)
    assert result.returncode == 2
    first = result.stderr.splitlines()[0]
    assert first == (
        f"error: {path}: model 'risk' version 'v1': the topology's features ['ip_in_uri'] are "
        "not the artifact's; the artifact's features ['ip_in_url'] are not in the topology "
        "(features must name the artifact's, in its order)"
    )
    assert "version 'v2'" in result.stderr and "Traceback" not in result.stderr


def test_validate_checks_the_sha256(run: Any, tmp_path: Path) -> None:
    import shutil

    v1 = Path(shutil.copytree(MODELS / "v1", tmp_path / "v1"))
    (v1 / "model.pt2").write_bytes((v1 / "model.pt2").read_bytes() + b"x")
    path = _with_models(tmp_path)
    doc = yaml.safe_load(path.read_text())
    doc["models"][0]["versions"][0]["path"] = str(v1)
    path.write_text(yaml.safe_dump(doc))
    result = run("validate", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines()[0].startswith(
        f"error: {path}: model 'risk' version 'v1': sha256 of {v1 / 'model.pt2'} is "
    )


def test_validate_checks_the_policies_against_the_learners(run: Any, tmp_path: Path) -> None:
    path = _with_models(tmp_path, "phishing-online.yaml")
    doc = yaml.safe_load(path.read_text())
    doc["online"]["policies"][1]["online_version"] = "onlin"
    path.write_text(yaml.safe_dump(doc))
    result = run("validate", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == f"error: {path}: invalid topology:"
    assert "online.policies[1]: 'onlin' is not an online learner of model 'risk'" in (result.stderr)


def test_control_without_a_broker_is_one_line_exit_1(run: Any) -> None:
    env = {
        "STREAM_INFER_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1",
        "STREAM_INFER_KAFKA__CONNECT_TIMEOUT_S": "1",
    }
    result = run("control", "topologies/phishing.yaml", "status", env=env)
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot reach Kafka at 127.0.0.1:1 within 1s")
    assert "Is the broker running?" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stdout == ""


def test_a_web_port_in_use_is_one_line_exit_2(run: Any) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {
            "STREAM_INFER_WORKER__WEB_PORT": str(port),
            "STREAM_INFER_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1",
        }
        result = run("worker", "topologies/phishing.yaml", env=env)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: worker.web_port {port} on 127.0.0.1 is in use (another worker?): set "
        "STREAM_INFER_WORKER__WEB_PORT to a free port"
    ]


def test_tail_drift_without_monitors_says_so_exit_2(run: Any) -> None:
    result = run("tail", "topologies/phishing.yaml", "--what", "drift")
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == (
        "error: topologies/phishing.yaml declares no online monitors: nothing writes drift "
        "events to phishing.drift"
    )


class FakeMessage:
    def __init__(self, topic: str, doc: dict[str, Any]) -> None:
        import orjson

        self._topic, self._value = topic, orjson.dumps(doc)

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return self._topic

    def value(self) -> bytes:
        return self._value


class FakeConsumer:
    """A consumer over a fixed list of records; its topics appear after ``missing_polls``."""

    records: ClassVar[list[FakeMessage]] = []
    missing_polls: ClassVar[int] = 0
    assigned: ClassVar[list[Any]] = []

    def __init__(self, conf: dict[str, Any]) -> None:
        self.polls = 0

    def list_topics(self, timeout: float = 0) -> Any:
        from types import SimpleNamespace

        self.polls += 1
        if self.polls <= type(self).missing_polls:
            return SimpleNamespace(topics={})
        names = {m.topic() for m in self.records} | {"phishing.predictions"}
        part = SimpleNamespace(leader=1)
        return SimpleNamespace(
            topics={n: SimpleNamespace(error=None, partitions={0: part}) for n in names}
        )

    def assign(self, parts: list[Any]) -> None:
        type(self).assigned = parts

    def consume(self, n: int, timeout: float) -> list[FakeMessage]:
        out, type(self).records = self.records[:n], self.records[n:]
        return out

    def close(self) -> None:
        pass


@pytest.fixture
def fake_kafka(monkeypatch: pytest.MonkeyPatch) -> type[FakeConsumer]:
    import confluent_kafka

    from stream_infer.io import clients

    monkeypatch.setattr(confluent_kafka, "Consumer", FakeConsumer)
    monkeypatch.setattr(clients, "check_reachable", lambda *a, **k: None)
    FakeConsumer.records, FakeConsumer.missing_polls, FakeConsumer.assigned = [], 0, []
    return FakeConsumer


def _ack(command_id: str, worker: str) -> FakeMessage:
    return FakeMessage(
        "phishing.control-acks",
        {"command_id": command_id, "worker": worker, "status": "applied"},
    )


def test_tail_acks_of_one_command_prints_its_answers_and_exits(
    run: Any, fake_kafka: type[FakeConsumer]
) -> None:
    from confluent_kafka import OFFSET_BEGINNING

    fake_kafka.records = [_ack("c0", "w1"), _ack("c1", "w1"), _ack("c0", "w2"), _ack("c1", "w2")]
    args = ("tail", "topologies/phishing.yaml", "--what", "acks", "--id", "c1")
    result = run(*args, "--workers", "2", "--wait", "30")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.count('"c1"') for line in lines] == [1, 1]
    assert {tp.offset for tp in fake_kafka.assigned} == {OFFSET_BEGINNING}
    # Fewer answers than asked for: exit 1, saying who answered.
    fake_kafka.records = [_ack("c1", "w1")]
    result = run(*args, "--workers", "2", "--wait", "0.5")
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        "1 of 2 workers answered c1 within 0.5s: w1; 1 did not"
    )


def test_tail_says_once_that_a_topic_does_not_exist_yet(
    run: Any, fake_kafka: type[FakeConsumer]
) -> None:
    fake_kafka.missing_polls = 3
    fake_kafka.records = [FakeMessage("phishing.predictions", {"id": "e1"})]
    result = run("tail", "topologies/phishing.yaml", "--count", "1")
    assert result.returncode == 0
    assert result.stderr.splitlines() == [
        "topic phishing.predictions does not exist yet; waiting for it (Ctrl-C stops)"
    ]
    assert result.stdout.splitlines() == ['{"id":"e1"}']


class OneWorkerAnswers:
    """A Controller whose command is answered by one worker, w1 (no broker)."""

    def __init__(self, topology: Any) -> None:
        pass

    def send(self, doc: dict[str, Any]) -> dict[str, Any]:
        return doc

    def acks(self, command_id: str, **_: Any) -> list[dict[str, Any]]:
        return [{"command_id": command_id, "worker": "w1", "status": "applied"}]

    def close(self) -> None:
        pass


@pytest.fixture
def one_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    from stream_infer.io import clients, controller

    monkeypatch.setattr(controller, "Controller", OneWorkerAnswers)
    monkeypatch.setattr(clients, "check_reachable", lambda *a, **k: None)


def test_control_writes_sent_to_stderr_and_only_acks_to_stdout(run: Any, one_worker: None) -> None:
    result = run("control", "topologies/phishing.yaml", "status")
    assert result.returncode == 0
    assert result.stderr.startswith('sent {"id":"cmd-')
    import orjson

    assert [orjson.loads(line)["worker"] for line in result.stdout.splitlines()] == ["w1"]


def test_control_with_fewer_answers_than_workers_exits_1_naming_who_answered(
    run: Any, one_worker: None
) -> None:
    """Issue 18 item 3: `control --workers 3` exited 0 when one worker answered."""
    result = run("control", "topologies/phishing.yaml", "status", "--workers", "3", "--wait", "1")
    assert result.returncode == 1
    last = result.stderr.splitlines()[-1]
    assert last.startswith("1 of 3 workers answered cmd-") and last.endswith(": w1; 2 did not")


def test_control_shadow_needs_a_version(run: Any) -> None:
    result = run("control", "topologies/phishing.yaml", "shadow", "--model", "risk")
    assert result.returncode == 2
    assert "shadow needs --version (stopping a shadow is `unshadow`)" in result.stderr


def test_worker_help_lists_options_and_overrides(run: Any) -> None:
    result = run("worker", "--help")
    assert result.returncode == 0
    assert "--log-level" in result.stdout
    assert "STREAM_INFER_WORKER__WEB_PORT" in result.stdout


def test_log_level_after_the_subcommand_and_version(run: Any) -> None:
    result = run("validate", "topologies/phishing.yaml", "--log-level", "debug")
    assert result.returncode == 0, result.stderr
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.splitlines() == ["stream-infer 0.1.0"]


def test_produce_help_documents_the_file_format(run: Any) -> None:
    result = run("produce", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert 'a "key" field sets the Kafka key' in text


def test_the_worker_prints_one_line_when_really_ready() -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from stream_infer.cli.serve import announce_when_ready

    answers = [503, 503, 200]

    class Readyz(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(answers.pop(0) if len(answers) > 1 else answers[0])
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Readyz)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    lines: list[str] = []
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert announce_when_ready(base, interval_s=0.01, echo=lines.append)
    finally:
        server.shutdown()
        server.server_close()
    assert lines == [
        f"ready: serving; metrics {base}/metrics, health {base}/healthz, readiness {base}/readyz"
    ]
    assert answers == [200]
