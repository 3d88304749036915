"""The label join's preconditions are refused at start when a setting breaks them: a producer
partitioner that does not send each key to one partition (issue 13 item 13). The assignor is
refused in tests/unit/test_kafka_config.py."""

from __future__ import annotations

from typing import Any

import pytest

from stream_infer.errors import ConfigError
from stream_infer.settings import KEYED_PARTITIONERS, parse_topology
from tests.unit.test_settings import minimal


def kafka(**settings: Any) -> dict[str, Any]:
    return minimal(kafka=settings)


@pytest.mark.parametrize("where", ["extra", "producer_extra"])
def test_a_partitioner_that_scatters_a_key_is_refused(where: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_topology(kafka(**{where: {"partitioner": "random"}}), env={})
    assert f"kafka.{where}.partitioner='random' does not map a key to one partition" in str(
        info.value
    )
    assert "murmur2_random is the Java client's partitioner" in str(info.value)


@pytest.mark.parametrize("partitioner", KEYED_PARTITIONERS)
def test_keyed_partitioners_are_accepted(partitioner: str) -> None:
    topo = parse_topology(kafka(extra={"partitioner": partitioner}), env={})
    assert topo.kafka.extra["partitioner"] == partitioner
