"""Shared helpers of the unit tier: a fake Kafka record and the JSON Schema validators."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"


class FakeRecord:
    """A Kafka record as the Record protocol reads it (confluent_kafka.Message's accessors).

    Records compare by identity, as two Kafka records with the same bytes are still two
    records: tests tell which record a dead letter came from with ``is``.
    """

    __slots__ = ("_key", "_offset", "_partition", "_topic", "_value")

    def __init__(
        self,
        value: bytes | None,
        key: bytes | None = None,
        *,
        topic: str | None = "t.features",
        partition: int | None = 0,
        offset: int | None = 0,
    ) -> None:
        self._value = value
        self._key = key
        self._topic = topic
        self._partition = partition
        self._offset = offset

    def value(self) -> bytes | None:
        return self._value

    def key(self) -> bytes | None:
        return self._key

    def topic(self) -> str | None:
        return self._topic

    def partition(self) -> int | None:
        return self._partition

    def offset(self) -> int | None:
        return self._offset


@pytest.fixture
def make_record() -> type[FakeRecord]:
    """``make_record(value, key, topic=..., partition=..., offset=...)``: a fake record."""
    return FakeRecord


@pytest.fixture(scope="session")
def validators() -> dict[str, Draft202012Validator]:
    """One validator per schemas/*.schema.json, by stem: ``validators["feature-event"]``."""
    out = {}
    for path in sorted(SCHEMA_DIR.glob("*.schema.json")):
        schema = json.loads(path.read_text(encoding="utf-8"))
        out[path.name.removesuffix(".schema.json")] = Draft202012Validator(schema)
    return out
