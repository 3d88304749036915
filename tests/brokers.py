"""Which broker the integration suite runs on, and why: one answer for the whole run.

The pytest hooks that print it (header and summary) live in tests/conftest.py, the only
conftest whose header hooks pytest calls; the integration fixtures import the rest.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass

import pytest

from stream_infer.local.apache_kafka import kafka_version, missing_tools
from stream_infer.settings import ENV_PREFIX

# The tests' own variables (STREAM_INFER_TEST_*): never topology overrides (settings skips them).
TEST_PREFIX = ENV_PREFIX + "TEST_"


def bootstrap_for_tests(env: Mapping[str, str] | None = None) -> str | None:
    """The external broker the tests should use instead of starting their own, if any."""
    return (os.environ if env is None else env).get(TEST_PREFIX + "BOOTSTRAP_SERVERS")


def docker_requested(env: Mapping[str, str] | None = None) -> bool:
    """Whether the tests were asked to run Kafka in a testcontainer."""
    value = (os.environ if env is None else env).get(TEST_PREFIX + "DOCKER", "")
    return value.lower() in {"1", "true", "yes"}


def test_broker_engine(env: Mapping[str, str] | None = None) -> str:
    """Which local broker the tests start: ``kafka`` (Apache Kafka, needs Java and Maven),
    ``tansu`` (the embedded one), or ``auto`` (Apache Kafka where it can run, else tansu)."""
    value = (os.environ if env is None else env).get(TEST_PREFIX + "BROKER", "auto").lower()
    if value not in {"auto", "kafka", "tansu"}:
        msg = f"{TEST_PREFIX}BROKER must be auto, kafka or tansu, got {value!r}"
        raise pytest.UsageError(msg)
    return value


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
