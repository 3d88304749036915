"""A smoke subset of the integration suite on tansu, the embedded broker of the demo.

The suite runs on Apache Kafka where Java is present; these tests run again on tansu so the
demo's zero-dependency broker stays proven: events in and predictions out in CI (and the
demo); dead letters, the health endpoints, a SIGKILLed worker and a hot swap under load with
two workers in the soak suite. They are the same test functions, collected here with ``bootstrap``
overridden. Where the whole suite
already runs on tansu they are skipped as duplicates, saying so.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from stream_infer.local.tansu import EmbeddedBroker
from tests.brokers import broker_choice
from tests.integration import test_control, test_serving
from tests.integration.test_serving import (
    test_every_event_gets_exactly_one_prediction_stamped_with_its_version,
)

__all__ = ["test_every_event_gets_exactly_one_prediction_stamped_with_its_version"]


# CI runs the one above on tansu (and the demo runs on it); these run again on tansu in the
# soak suite (`python3 dev.py soak`), to keep CI's time down. Wrappers, so that the soak mark
# stays off the originals, which CI runs on Apache Kafka.
@pytest.mark.soak
def test_bad_events_go_to_the_dead_letter_topic_while_good_ones_flow(make_setup: Any) -> None:
    test_serving.test_bad_events_go_to_the_dead_letter_topic_while_good_ones_flow(make_setup)


@pytest.mark.soak
def test_health_readiness_and_metrics_endpoints(make_setup: Any) -> None:
    test_serving.test_health_readiness_and_metrics_endpoints(make_setup)


@pytest.mark.soak
def test_sigkill_mid_stream_loses_no_event(make_setup: Any) -> None:
    test_serving.test_sigkill_mid_stream_loses_no_event(make_setup)


@pytest.mark.soak
def test_swap_under_load_loses_nothing_and_switches(make_setup: Any) -> None:
    test_control.test_swap_under_load_loses_nothing_and_switches(make_setup)


@pytest.fixture(scope="module")
def bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Overrides the suite's broker for this module: a tansu of its own."""
    if broker_choice().engine == "tansu":
        pytest.skip("the whole integration suite runs on tansu here; no need to repeat it")
    log_path = tmp_path_factory.mktemp("tansu") / "tansu.log"
    with EmbeddedBroker(log_path=log_path) as broker:
        yield broker.bootstrap_servers
