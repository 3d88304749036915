"""A worker whose publish raises for the batch holding one event id: a fault on the serving
path, injected from outside the package (tests/integration/test_faults.py).

    python -m tests.integration.faulty_worker EVENT_ID [stream-infer arguments ...]

The batch whose predictions include ``EVENT_ID`` makes ``Publisher.publish`` (under
exactly_once ``TransactionalPublisher.submit``) raise
KafkaException, as produce() used to raise out of it on a fatal producer or a record too
large. Every other batch is published as usual.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from confluent_kafka import KafkaError, KafkaException

from stream_infer.cli import main
from stream_infer.core.events import OutRecord
from stream_infer.io.publisher import Publisher, Ticket
from stream_infer.io.source import SourceBatch
from stream_infer.io.transactions import TransactionalPublisher


def fail_batch_holding(event_id: str) -> None:
    marker = f'"id":"{event_id}"'.encode()
    publish = Publisher.publish

    def faulty(self: Publisher, records: Sequence[OutRecord], ticket: Ticket) -> None:
        if any(marker in r.value for r in records):
            msg = f"injected: publish fails for the batch holding {event_id}"
            raise KafkaException(KafkaError(KafkaError._STATE, msg))
        publish(self, records, ticket)

    Publisher.publish = faulty  # type: ignore[method-assign]
    submit = TransactionalPublisher.submit

    def faulty_submit(
        self: TransactionalPublisher,
        batch: SourceBatch,
        records: Sequence[OutRecord],
        ticket: Ticket,
        after_commit: Callable[[], object] | None = None,
    ) -> None:
        if any(marker in r.value for r in records):
            msg = f"injected: publish fails for the batch holding {event_id}"
            raise KafkaException(KafkaError(KafkaError._STATE, msg))
        submit(self, batch, records, ticket, after_commit)

    TransactionalPublisher.submit = faulty_submit  # type: ignore[method-assign]


if __name__ == "__main__":
    fail_batch_holding(sys.argv[1])
    main(sys.argv[2:])
