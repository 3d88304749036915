"""Suite-wide hooks: pytest's header and summary say which broker the integration tests use."""

from __future__ import annotations

from typing import Any

from stream_infer.local.apache_kafka import kafka_version
from tests.brokers import broker_choice, started


def pytest_report_header() -> str:
    return f"integration broker: {broker_choice().why}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if "kafka" in started:
        took = started["kafka"]
        terminalreporter.write_line(
            f"integration broker: Apache Kafka {kafka_version()} started in {took:.1f} s"
        )
