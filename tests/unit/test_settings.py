"""The topology: loading, validation errors that name the field, env overrides, secrets."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from stream_infer.errors import ConfigError
from stream_infer.examples import phishing
from stream_infer.io.clients import consumer_config, producer_config
from stream_infer.settings import load_topology, parse_topology

TOPOLOGIES = Path(__file__).resolve().parents[2] / "topologies"

MINIMAL: dict[str, Any] = {
    "name": "t",
    "topics": {"input": "in", "predictions": "out", "dead_letter": "dlq", "control": "ctl"},
    "features": ["f1", "f2"],
    "models": [
        {
            "name": "risk",
            "serving": "v1",
            "versions": [{"version": "v1", "path": "models/v1"}],
        }
    ],
}


def minimal(**sections: Any) -> dict[str, Any]:
    data = copy.deepcopy(MINIMAL)
    data.update(sections)
    return data


def config_error(data: dict[str, Any], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_topology(data, env=env or {})
    return str(info.value)


def test_the_phishing_topology_loads() -> None:
    path = TOPOLOGIES / "phishing.yaml"
    topo = load_topology(path, env={})

    assert topo.name == "phishing"
    assert topo.features == phishing.FEATURES
    assert topo.group_id == "stream-infer.phishing"
    assert topo.topics.input == "phishing.features"
    assert topo.batching.max_batch_size == 512
    assert topo.device == "auto"
    risk = topo.model("risk")
    assert risk is not None
    assert risk.serving == "v1"
    assert [v.version for v in risk.versions] == ["v1", "v2"]
    for v in risk.versions:
        assert v.path.is_absolute()
        assert v.path == (path.parent / f"../models/phishing/risk/{v.version}").resolve()
    assert topo.prediction_topic(risk) == "phishing.predictions"
    assert "phishing.drift" in topo.all_topics()


def test_relative_paths_resolve_from_the_file_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "t.yaml"
    data = minimal()
    data["models"][0]["versions"].append({"version": "v2", "path": "/srv/models/v2"})
    data["models"][0]["versions"][0]["path"] = "../models/v1"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    monkeypatch.chdir(tmp_path / "conf")

    topo = load_topology(Path("t.yaml"), env={})

    versions = topo.models[0].versions
    assert versions[0].path == (tmp_path / "models" / "v1").resolve()
    assert versions[1].path == Path("/srv/models/v2")


def test_parse_without_base_dir_keeps_paths_as_given() -> None:
    topo = parse_topology(minimal(), env={})
    assert topo.models[0].versions[0].path == Path("models/v1")


def test_defaults() -> None:
    topo = parse_topology(minimal(), env={})
    assert topo.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert topo.kafka.security_protocol == "PLAINTEXT"
    assert topo.group_id == "stream-infer.t"
    assert topo.batching.max_batch_size == 512
    assert topo.batching.max_wait_ms == 10.0
    assert topo.limits.max_event_bytes == 64 * 1024
    assert topo.all_topics() == ["in", "out", "dlq", "ctl"]


def test_a_topology_is_frozen() -> None:
    topo = parse_topology(minimal(), env={})
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        topo.name = "other"  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        topo.batching.max_batch_size = 1  # type: ignore[misc]


# --- errors name the field ------------------------------------------------------------------


def test_a_missing_required_field_is_named() -> None:
    data = minimal()
    del data["topics"]["input"]
    assert "topics.input: Field required" in config_error(data)


def test_a_missing_section_is_named() -> None:
    data = minimal()
    del data["models"]
    assert "  models: Field required" in config_error(data)


def test_a_missing_version_path_is_named() -> None:
    data = minimal()
    del data["models"][0]["versions"][0]["path"]
    assert "models.0.versions.0.path: Field required" in config_error(data)


@pytest.mark.parametrize(
    ("section", "value", "where"),
    [
        ("topics", {**MINIMAL["topics"], "inptu": "x"}, "topics.inptu"),
        ("batching", {"max_batch_sise": 5}, "batching.max_batch_sise"),
        ("kafka", {"bootstrap": "b:9092"}, "kafka.bootstrap"),
        ("batchin", {"max_batch_size": 5}, "batchin"),
    ],
)
def test_an_unknown_key_is_named(section: str, value: Any, where: str) -> None:
    message = config_error(minimal(**{section: value}))
    assert f"{where}: Extra inputs are not permitted" in message


@pytest.mark.parametrize("name", ["has space", "", "a/b", "x" * 250, "caf\u00e9"])
def test_a_bad_topic_name_is_named(name: str) -> None:
    message = config_error(minimal(topics={**MINIMAL["topics"], "input": name}))
    assert f"topics.input: Value error, {name!r} is not a valid Kafka topic name" in message


def test_a_bad_optional_topic_name_is_named() -> None:
    message = config_error(minimal(topics={**MINIMAL["topics"], "shadow": "no good"}))
    assert "topics.shadow: Value error, 'no good' is not a valid Kafka topic name" in message


def test_a_serving_version_must_be_declared() -> None:
    data = minimal()
    data["models"][0]["serving"] = "v9"
    message = config_error(data)
    assert "models.0: Value error, serving version 'v9' is not among the versions ['v1']" in message


def test_a_version_may_not_be_declared_twice() -> None:
    data = minimal()
    data["models"][0]["versions"].append({"version": "v1", "path": "elsewhere"})
    message = config_error(data)
    assert "models.0: Value error, model 'risk' declares a version twice: ['v1', 'v1']" in message


def test_model_names_are_unique() -> None:
    data = minimal()
    data["models"].append(copy.deepcopy(data["models"][0]))
    assert "model names must be unique, got ['risk', 'risk']" in config_error(data)


def test_feature_names_are_unique() -> None:
    assert "features: Value error, feature names must be unique" in config_error(
        minimal(features=["f1", "f1"])
    )


def test_a_bad_version_name_is_named() -> None:
    data = minimal()
    data["models"][0]["versions"][0]["version"] = "v 1"
    assert "models.0.versions.0.version: Value error" in config_error(data)


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CUDA", "cuda:-1", "mps"])
def test_a_bad_device_is_named(device: str) -> None:
    message = config_error(minimal(device=device))
    assert f"device: Value error, {device!r} is not a device" in message


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:7"])
def test_good_devices(device: str) -> None:
    assert parse_topology(minimal(device=device), env={}).device == device


@pytest.mark.parametrize(
    "kafka",
    [
        {"security_protocol": "SASL_SSL"},
        {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "u"},
        {"security_protocol": "SASL_SSL", "sasl_username": "u", "sasl_password": "p"},
    ],
)
def test_sasl_needs_credentials(kafka: dict[str, str]) -> None:
    message = config_error(minimal(kafka=kafka))
    assert "  kafka: Value error, security_protocol SASL" in message
    assert "needs sasl_mechanism, sasl_username and sasl_password" in message


@pytest.mark.parametrize(
    ("section", "value", "where"),
    [
        ("batching", {"max_batch_size": 0}, "batching.max_batch_size"),
        ("batching", {"max_wait_ms": -1}, "batching.max_wait_ms"),
        ("limits", {"max_event_bytes": 10}, "limits.max_event_bytes"),
        ("kafka", {"session_timeout_ms": 5}, "kafka.session_timeout_ms"),
        ("worker", {"web_port": 70000}, "worker.web_port"),
        ("topics", {**MINIMAL["topics"], "partitions": 0}, "topics.partitions"),
    ],
)
def test_a_value_out_of_range_is_named(section: str, value: Any, where: str) -> None:
    assert f"  {where}: Input should be" in config_error(minimal(**{section: value}))


def test_every_error_is_reported_at_once() -> None:
    data = minimal(device="gpu", batching={"max_batch_size": 0})
    del data["topics"]["control"]
    message = config_error(data)
    assert message.startswith("invalid topology:\n")
    for where in ("topics.control", "batching.max_batch_size", "device"):
        assert f"  {where}: " in message


def test_an_error_from_a_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("name: t\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_topology(path, env={})
    assert info.value.source == str(path)
    assert str(info.value).startswith(f"{path}: invalid topology:")
    assert "topics: Field required" in str(info.value)


# --- environment overrides ------------------------------------------------------------------


def test_env_overrides_apply_on_top_of_the_file() -> None:
    env = {
        "STREAM_INFER_KAFKA__BOOTSTRAP_SERVERS": "broker-1:9093,broker-2:9093",
        "STREAM_INFER_BATCHING__MAX_BATCH_SIZE": "64",
        "STREAM_INFER_DEVICE": "cpu",
        "STREAM_INFER_TEST_BOOTSTRAP_SERVERS": "ignored:1",  # the test harness's, not a field
        "OTHER_BATCHING__MAX_BATCH_SIZE": "7",
    }
    topo = load_topology(TOPOLOGIES / "phishing.yaml", env=env)

    assert topo.kafka.bootstrap_servers == "broker-1:9093,broker-2:9093"
    assert topo.batching.max_batch_size == 64
    assert topo.device == "cpu"
    # The rest of each section still comes from the file.
    assert topo.batching.max_batches_in_flight == 4
    assert topo.kafka.session_timeout_ms == 10000
    assert topo.topics.input == "phishing.features"


def test_a_bad_env_override_names_the_field() -> None:
    env = {"STREAM_INFER_BATCHING__MAX_BATCH_SIZE": "lots"}
    assert (
        "STREAM_INFER_BATCHING__MAX_BATCH_SIZE (batching.max_batch_size): Input should be a "
        "valid integer" in config_error(minimal(), env)
    )


def test_an_unknown_env_override_is_refused() -> None:
    env = {"STREAM_INFER_BATCHING__MAX_BATCH": "5"}
    assert (
        "STREAM_INFER_BATCHING__MAX_BATCH (batching.max_batch): Extra inputs are not permitted"
        in config_error(minimal(), env)
    )


def test_an_empty_env_changes_nothing() -> None:
    assert parse_topology(minimal(), env={}) == parse_topology(
        minimal(), env={"UNRELATED": "1", "PATH": "/bin"}
    )


# --- librdkafka and secrets -----------------------------------------------------------------


def sasl_topology(**kafka: Any) -> Any:
    settings = {
        "bootstrap_servers": "b1:9094",
        "client_id": "worker-1",
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": "stream-infer",
        "sasl_password": "hunter2-secret",
        "ssl_ca_location": "/etc/kafka/ca.pem",
        **kafka,
    }
    return parse_topology(minimal(kafka=settings), env={})


def test_librdkafka_mapping_with_sasl_ssl_and_extra() -> None:
    topo = sasl_topology(extra={"linger.ms": 5, "enable.idempotence": True})
    assert topo.kafka.librdkafka() == {
        "bootstrap.servers": "b1:9094",
        "client.id": "worker-1",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "stream-infer",
        "sasl.password": "hunter2-secret",
        "ssl.ca.location": "/etc/kafka/ca.pem",
        "linger.ms": 5,
        "enable.idempotence": True,
    }


def test_librdkafka_mapping_leaves_unset_options_out() -> None:
    topo = parse_topology(minimal(), env={})
    assert topo.kafka.librdkafka() == {
        "bootstrap.servers": "127.0.0.1:9092",
        "client.id": "stream-infer",
        "security.protocol": "PLAINTEXT",
    }


def test_extra_properties_pass_through_last() -> None:
    topo = parse_topology(minimal(kafka={"extra": {"client.id": "override"}}), env={})
    assert topo.kafka.librdkafka()["client.id"] == "override"


def test_the_sasl_password_is_secret() -> None:
    topo = sasl_topology()
    assert isinstance(topo.kafka.sasl_password, pydantic.SecretStr)
    assert topo.kafka.sasl_password.get_secret_value() == "hunter2-secret"
    for text in (repr(topo), str(topo), repr(topo.kafka), topo.model_dump_json()):
        assert "hunter2" not in text


def test_the_sasl_password_can_come_from_the_env() -> None:
    data = minimal(
        kafka={"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "u"}
    )
    topo = parse_topology(data, env={"STREAM_INFER_KAFKA__SASL_PASSWORD": "from-env"})
    assert topo.kafka.librdkafka()["sasl.password"] == "from-env"
    assert "from-env" not in repr(topo)


# --- the file itself ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("name: [unclosed\n", "not valid YAML"),
        ("key: value\n  bad indent: x\n", "not valid YAML"),
        ("- a\n- b\n", "a topology must be a YAML mapping"),
        ("just a string\n", "a topology must be a YAML mapping"),
        ("", "a topology must be a YAML mapping"),
    ],
    ids=["unclosed", "indent", "list", "scalar", "empty"],
)
def test_a_file_that_is_not_a_mapping(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_topology(path, env={})
    assert str(info.value).startswith(f"{path}: {fragment}")


def test_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_topology(path, env={})
    assert str(info.value) == f"{path}: cannot read topology file: No such file or directory"


def test_producer_extra_reaches_the_producer_only() -> None:
    topo = parse_topology(
        minimal(
            kafka={
                "extra": {"message.timeout.ms": 60_000, "linger.ms": 1},
                "producer_extra": {"message.timeout.ms": 1500, "enable.idempotence": False},
            }
        ),
        env={},
    )
    producer = producer_config(topo.kafka)
    assert producer["message.timeout.ms"] == 1500  # after extra
    assert producer["enable.idempotence"] is False  # over the built-in default
    assert producer["linger.ms"] == 1
    consumer = consumer_config(topo.kafka, "g")
    assert consumer["message.timeout.ms"] == 60_000
    assert "enable.idempotence" not in consumer
    assert "enable.idempotence" not in topo.kafka.librdkafka()


def test_producer_extra_values_are_validated() -> None:
    assert "kafka.producer_extra" in config_error(
        minimal(kafka={"producer_extra": {"message.timeout.ms": [1, 2]}})
    )


# --- drift policies checked against the rest of the topology (hardening item 16) -------------


def online_with(
    *policies: dict[str, Any], monitors: tuple[str, ...] = ("error",)
) -> dict[str, Any]:
    model = MINIMAL["models"][0]["name"]
    topics = MINIMAL["topics"] | {"labels": "t.labels", "drift": "t.drift"}
    return minimal(
        topics=topics,
        online={
            "learners": [{"model": model, "version": "online"}],
            "monitors": [{"signal": s} for s in monitors],
            "policies": list(policies),
        },
    )


@pytest.mark.parametrize(
    ("policy", "said"),
    [
        (
            {"signal": "feature:f1", "action": "reset_learner", "online_version": "online"},
            "needs `model`: input drift is of no one model",
        ),
        (
            {"signal": "feature:f1", "action": "rollback_canary"},
            "input drift is of no one version",
        ),
        ({"signal": "prediction", "action": "alert"}, "no monitor watches signal 'prediction'"),
        ({"signal": "error", "action": "alert", "model": "nope"}, "unknown model 'nope'"),
        (
            {"signal": "error", "action": "shift_to_online", "online_version": "v9"},
            "'v9' is not an online learner of model",
        ),
    ],
)
def test_policies_that_could_never_act_are_refused(policy: dict[str, Any], said: str) -> None:
    data = online_with(policy, monitors=("error", "feature:f1"))
    assert said in config_error(data)


def test_a_reset_on_input_drift_for_a_named_model_is_accepted() -> None:
    model = MINIMAL["models"][0]["name"]
    policy = {
        "signal": "feature:f1",
        "action": "reset_learner",
        "model": model,
        "online_version": "online",
    }
    topo = parse_topology(online_with(policy, monitors=("feature:f1",)), env={})
    assert topo.online.policies[0].model == model


def test_an_outage_is_said_before_stuck_deliveries_fail_liveness() -> None:
    """With the grace at or past max_unacked_s, every outage longer than max_unacked_s would
    fail /healthz before /healthz says the outage: a restart loop into an unreachable cluster."""
    problem = config_error(minimal(limits={"max_unacked_s": 30, "unreachable_grace_s": 30}))
    assert "unreachable_grace_s (30) must be shorter than max_unacked_s (30)" in problem
    parse_topology(minimal(limits={"max_unacked_s": 31, "unreachable_grace_s": 30}), env={})
