"""A worker whose transactions stay open a while before one stage: a zombie test's worker
(tests/integration/test_exactly_once.py), frozen with near certainty inside a transaction.

    python -m tests.integration.slow_transactions_worker STAGE SECONDS [stream-infer arguments ...]

Before every ``STAGE`` (``send_offsets``: the records are produced, the offsets not yet sent;
``commit``: the offsets are sent, the commit not yet asked) the transaction thread waits
``SECONDS``. Nothing else changes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from stream_infer.cli import main
from stream_infer.io.transactions import TransactionalPublisher


def slow_before(stage: str, seconds: float) -> None:
    run_stage = TransactionalPublisher._stage

    def slow(self: TransactionalPublisher, name: str, run: Callable[[], object]) -> None:
        if name == stage:
            time.sleep(seconds)
        run_stage(self, name, run)

    TransactionalPublisher._stage = slow  # type: ignore[method-assign,assignment]


if __name__ == "__main__":
    slow_before(sys.argv[1], float(sys.argv[2]))
    main(sys.argv[3:])
