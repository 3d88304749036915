"""A smoke subset of the integration suite on tansu, the embedded broker of the demo.

The suite runs on Apache Kafka where Java is present; these tests run again on tansu so the
demo's zero-dependency broker stays proven: events in and predictions out, dead letters,
a SIGKILLed worker, the health endpoints, a hot swap under load with two workers. They are
the same test functions, collected here with ``bootstrap`` overridden. Where the whole suite
already runs on tansu they are skipped as duplicates, saying so.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from stream_infer.broker import EmbeddedBroker
from tests.brokers import broker_choice
from tests.integration.test_control import test_swap_under_load_loses_nothing_and_switches
from tests.integration.test_serving import (
    test_bad_events_go_to_the_dead_letter_topic_while_good_ones_flow,
    test_every_event_gets_exactly_one_prediction_stamped_with_its_version,
    test_health_readiness_and_metrics_endpoints,
    test_sigkill_mid_stream_loses_no_event,
)

__all__ = [
    "test_bad_events_go_to_the_dead_letter_topic_while_good_ones_flow",
    "test_every_event_gets_exactly_one_prediction_stamped_with_its_version",
    "test_health_readiness_and_metrics_endpoints",
    "test_sigkill_mid_stream_loses_no_event",
    "test_swap_under_load_loses_nothing_and_switches",
]


@pytest.fixture(scope="module")
def bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Overrides the suite's broker for this module: a tansu of its own."""
    if broker_choice().engine == "tansu":
        pytest.skip("the whole integration suite runs on tansu here; no need to repeat it")
    log_path = tmp_path_factory.mktemp("tansu") / "tansu.log"
    with EmbeddedBroker(log_path=log_path) as broker:
        yield broker.bootstrap_servers
