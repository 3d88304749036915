"""A worker whose transactions stay open a while before one stage: a zombie test's worker
(tests/integration/test_exactly_once.py), frozen inside a transaction at a known point.

    python -m tests.integration.slow_transactions_worker STAGE SECONDS MARK [stream-infer args]

Before every ``STAGE`` (``send_offsets``: the records are produced, the offsets not yet sent;
``commit``: the offsets are sent, the commit not yet asked) the transaction thread waits
``SECONDS``. The file ``MARK`` exists exactly while the thread is inside that wait (created
before the sleep, removed after it and before the stage runs): a test that stops the process
and still finds ``MARK`` knows the stage has not been called. Nothing else changes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from stream_infer.cli import main
from stream_infer.io.transactions import TransactionalPublisher


def slow_before(stage: str, seconds: float, mark: Path) -> None:
    run_stage = TransactionalPublisher._stage

    def slow(self: TransactionalPublisher, name: str, run: Callable[[], object]) -> None:
        if name == stage:
            mark.touch()
            time.sleep(seconds)
            mark.unlink()
        run_stage(self, name, run)

    TransactionalPublisher._stage = slow  # type: ignore[method-assign,assignment]


if __name__ == "__main__":
    slow_before(sys.argv[1], float(sys.argv[2]), Path(sys.argv[3]))
    main(sys.argv[4:])
