"""Environment overrides (issue 18 item 6): only STREAM_INFER_<SECTION>__<FIELD> and the known
top-level fields are overrides, so other tools' STREAM_INFER_* variables (dev.py's
STREAM_INFER_TORCH_SPEC, STREAM_INFER_CACHE_DIR) coexist; an override's error names the
variable it came from, not the YAML file."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_infer.errors import ConfigError
from stream_infer.settings import load_topology

TOPOLOGY = Path(__file__).resolve().parents[2] / "topologies" / "phishing.yaml"


def error(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_topology(TOPOLOGY, env=env)
    return str(info.value)


@pytest.mark.parametrize(
    "name", ["STREAM_INFER_TORCH_SPEC", "STREAM_INFER_CACHE_DIR", "STREAM_INFER_TEST_BROKER"]
)
def test_other_tools_variables_are_not_overrides(name: str) -> None:
    topo = load_topology(TOPOLOGY, env={name: "torch==2.5.0"})
    assert topo.name == "phishing"


def test_a_section_field_and_a_top_level_field_override() -> None:
    env = {"STREAM_INFER_WORKER__WEB_PORT": "7001", "STREAM_INFER_DEVICE": "cpu"}
    topo = load_topology(TOPOLOGY, env=env)
    assert (topo.worker.web_port, topo.device) == (7001, "cpu")


def test_a_bad_override_names_the_variable_not_the_file() -> None:
    message = error({"STREAM_INFER_WORKER__WEB_PORT": "lots"})
    assert message.startswith("environment: invalid override:")
    assert "STREAM_INFER_WORKER__WEB_PORT (worker.web_port): Input should be" in message
    assert str(TOPOLOGY) not in message


def test_a_misspelt_field_names_the_variable() -> None:
    message = error({"STREAM_INFER_KAFKA__BOOTSTRAP_SERVER": "b:9092"})
    assert "STREAM_INFER_KAFKA__BOOTSTRAP_SERVER (kafka.bootstrap_server): Extra inputs" in message


def test_an_unknown_section_is_refused_naming_the_variable() -> None:
    message = error({"STREAM_INFER_KAFAK__BOOTSTRAP_SERVERS": "b:9092"})
    assert message.startswith("environment: STREAM_INFER_KAFAK__BOOTSTRAP_SERVERS:")
    assert "'kafak' is not a topology section" in message and "KAFKA" in message


def test_a_top_level_override_names_its_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_topology(TOPOLOGY, env={"STREAM_INFER_NAME": "bad name!"})
    assert "STREAM_INFER_NAME (name)" in str(info.value)
