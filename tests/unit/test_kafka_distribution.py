"""Where Apache Kafka cannot run, one line says why (and the tests fall back to tansu)."""

from __future__ import annotations

import pytest

from stream_infer.errors import BrokerError
from stream_infer.local.apache_kafka import distribution


def test_no_java_is_said_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distribution.shutil, "which", lambda name: None)
    why = distribution.missing_tools()
    assert why is not None
    assert "no `java` on PATH" in why and "\n" not in why
    with pytest.raises(BrokerError, match="cannot run Apache Kafka: no `java`"):
        distribution.kafka_classpath()


def test_an_old_java_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distribution.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(distribution, "_java_major", lambda java: 11)
    assert distribution.missing_tools() == (
        f"`java` is version 11; Apache Kafka {distribution.kafka_version()} needs 17+"
    )


def test_no_maven_and_nothing_cached_is_said(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.setenv("STREAM_INFER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(
        distribution.shutil, "which", lambda name: None if name == "mvn" else f"/usr/bin/{name}"
    )
    monkeypatch.setattr(distribution, "_java_major", lambda java: 17)
    why = distribution.missing_tools()
    assert why is not None and "no `mvn` on PATH" in why


def test_the_pom_pins_a_kafka_4_version() -> None:
    assert distribution.kafka_version().startswith("4.")
