"""The local Kafka launcher's cluster ids: never starting with "-", which Kafka's storage tool
reads as an option (``format -t -x...`` fails: seen once in a bench run)."""

from __future__ import annotations

import uuid

import pytest

from stream_infer.local.apache_kafka import cluster


def test_an_id_that_would_start_with_a_dash_is_drawn_again(monkeypatch: pytest.MonkeyPatch) -> None:
    dash = uuid.UUID(bytes=b"\xf8" + bytes(15))  # base64 of 0b111110.. starts with "-"
    plain = uuid.UUID(bytes=b"\x00" + bytes(range(1, 16)))
    drawn = iter([dash, dash, plain])
    monkeypatch.setattr(cluster.uuid, "uuid4", lambda: next(drawn))
    found = cluster.new_cluster_id()
    assert found == "AAECAwQFBgcICQoLDA0ODw"
    assert next(drawn, None) is None  # both dashed ids were drawn and refused


def test_ids_are_22_url_safe_characters() -> None:
    ids = {cluster.new_cluster_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)
