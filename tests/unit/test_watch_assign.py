"""assign_all: waits for a just-created topic's metadata, and names a topic that never comes."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING

from stream_infer.errors import BrokerError
from stream_infer.io.watch import assign_all


class FakeConsumer:
    """list_topics answers from a script: the topic appears, leaderless first, then led."""

    def __init__(self, answers: list[dict[str, list[int]]]) -> None:
        self.answers = answers
        self.assigned: list[Any] = []

    def list_topics(self, timeout: float) -> Any:
        topics = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return SimpleNamespace(
            topics={
                name: SimpleNamespace(
                    error=None,
                    partitions={i: SimpleNamespace(leader=lead) for i, lead in enumerate(leaders)},
                )
                for name, leaders in topics.items()
            }
        )

    def assign(self, parts: list[Any]) -> None:
        self.assigned = parts


def test_waits_until_every_partition_has_a_leader() -> None:
    consumer = FakeConsumer([{}, {"t": [-1, 1]}, {"t": [1, 1], "u": [1]}])
    assign_all(consumer, ["t", "u"], from_beginning=True)  # type: ignore[arg-type]
    got = sorted((tp.topic, tp.partition, tp.offset) for tp in consumer.assigned)
    assert got == [
        ("t", 0, OFFSET_BEGINNING),
        ("t", 1, OFFSET_BEGINNING),
        ("u", 0, OFFSET_BEGINNING),
    ]


def test_a_topic_that_never_appears_is_named() -> None:
    consumer = FakeConsumer([{"t": [1]}])
    with pytest.raises(BrokerError, match=r"\['missing'\]"):
        assign_all(consumer, ["t", "missing"], from_beginning=False, timeout_s=0.3)  # type: ignore[arg-type]
    assert consumer.assigned == []
