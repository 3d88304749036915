"""Which broker the integration suite runs on, and why: one answer for the whole run.

The pytest hooks that print it (header and summary) live in tests/conftest.py, the only
conftest whose header hooks pytest calls; the integration fixtures import the rest.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest

from stream_infer.local.apache_kafka import kafka_version, missing_tools
from stream_infer.settings import bootstrap_for_tests, docker_requested, test_broker_engine

# Filled by the session's broker fixture: what the integration broker took to start.
started: dict[str, float] = {}


@dataclass(frozen=True)
class BrokerChoice:
    """The broker the integration suite runs on, and one line saying why."""

    engine: str  # external | docker | kafka | tansu
    why: str

    @property
    def is_apache_kafka(self) -> bool:
        return self.engine in {"external", "docker", "kafka"}


@functools.cache
def broker_choice() -> BrokerChoice:
    if bootstrap_for_tests():
        return BrokerChoice("external", f"the external cluster {bootstrap_for_tests()}")
    if docker_requested():
        return BrokerChoice("docker", "a Kafka testcontainer (STREAM_INFER_TEST_DOCKER=1)")
    wanted = test_broker_engine()
    if wanted == "tansu":
        return BrokerChoice("tansu", "tansu, the embedded broker (STREAM_INFER_TEST_BROKER=tansu)")
    why_not = missing_tools()
    if why_not is None:
        return BrokerChoice("kafka", f"Apache Kafka {kafka_version()} (KRaft), started here")
    if wanted == "kafka":
        raise pytest.UsageError(f"STREAM_INFER_TEST_BROKER=kafka, but {why_not}")
    return BrokerChoice("tansu", f"tansu, the embedded broker: Apache Kafka cannot run, {why_not}")


def local_kafka_missing() -> str | None:
    """Why a test cannot start Apache Kafka clusters of its own here (None when it can)."""
    if broker_choice().engine == "tansu" and test_broker_engine() == "tansu":
        return "STREAM_INFER_TEST_BROKER=tansu"
    return missing_tools()


def require_local_kafka() -> None:
    """Skip, saying why, a test that starts Apache Kafka nodes of its own."""
    why = local_kafka_missing()
    if why:
        pytest.skip(f"needs Apache Kafka started by the tests: {why}")
