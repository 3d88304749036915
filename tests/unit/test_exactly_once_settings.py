"""processing.guarantee and what exactly_once asks of the configuration: the defaults it
changes, the librdkafka properties it owns (refused in kafka.extra / producer_extra), and the
producer and consumer configurations it makes."""

from __future__ import annotations

from typing import Any

import pytest

from stream_infer.io.clients import (
    consumer_config,
    exactly_once_consumer_config,
    producer_config,
    transactional_producer_config,
)
from stream_infer.settings import Topology, parse_topology
from tests.unit.test_settings import config_error, minimal


def eos(**sections: Any) -> dict[str, Any]:
    """The minimal topology under exactly_once, with these sections."""
    processing = sections.pop("processing", {}) | {"guarantee": "exactly_once"}
    return minimal(processing=processing, **sections)


def topo(data: dict[str, Any], env: dict[str, str] | None = None) -> Topology:
    return parse_topology(data, env=env or {})


# --- processing.guarantee ---------------------------------------------------------------------


def test_at_least_once_is_the_default_and_keeps_four_batches_in_flight() -> None:
    t = topo(minimal())
    assert t.processing.guarantee == "at_least_once"
    assert not t.processing.exactly_once
    assert t.batching.max_batches_in_flight == 4


def test_exactly_once_makes_two_batches_in_flight_the_default() -> None:
    t = topo(eos())
    assert t.processing.exactly_once
    assert t.batching.max_batches_in_flight == 2


def test_exactly_once_keeps_other_batching_settings_and_the_default_applies_beside_them() -> None:
    t = topo(eos(batching={"max_batch_size": 64, "max_wait_ms": 3}))
    assert (t.batching.max_batch_size, t.batching.max_wait_ms) == (64, 3.0)
    assert t.batching.max_batches_in_flight == 2


@pytest.mark.parametrize("n", [1, 4, 8])
def test_an_explicit_max_batches_in_flight_is_kept_under_exactly_once(n: int) -> None:
    assert topo(eos(batching={"max_batches_in_flight": n})).batching.max_batches_in_flight == n


def test_the_guarantee_comes_from_the_env_with_its_default() -> None:
    env = {"STREAM_INFER_PROCESSING__GUARANTEE": "exactly_once"}
    t = topo(minimal(), env)
    assert t.processing.exactly_once
    assert t.batching.max_batches_in_flight == 2


def test_an_explicit_max_batches_in_flight_from_the_env_is_kept() -> None:
    env = {
        "STREAM_INFER_PROCESSING__GUARANTEE": "exactly_once",
        "STREAM_INFER_BATCHING__MAX_BATCHES_IN_FLIGHT": "6",
    }
    assert topo(minimal(), env).batching.max_batches_in_flight == 6


def test_the_env_can_turn_exactly_once_off_again() -> None:
    t = topo(eos(), {"STREAM_INFER_PROCESSING__GUARANTEE": "at_least_once"})
    assert not t.processing.exactly_once
    assert t.batching.max_batches_in_flight == 4


def test_an_unknown_guarantee_is_refused_naming_the_field() -> None:
    message = config_error(minimal(processing={"guarantee": "exactly_twice"}))
    assert "processing.guarantee: Input should be 'at_least_once' or 'exactly_once'" in message


# --- properties stream-infer owns under exactly_once ------------------------------------------


@pytest.mark.parametrize("where", ["extra", "producer_extra"])
@pytest.mark.parametrize(
    ("key", "value"),
    [("enable.idempotence", True), ("transaction.timeout.ms", 60000)],
)
def test_a_transaction_property_in_extra_is_refused_naming_it(
    where: str, key: str, value: object
) -> None:
    message = config_error(eos(kafka={where: {key: value}}))
    assert f"kafka.{where}.{key} is set by stream-infer under processing.guarantee" in message
    assert "kafka.transaction_timeout_ms" in message


@pytest.mark.parametrize("where", ["extra", "producer_extra"])
@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_a_transactional_id_is_refused_under_either_guarantee(where: str, guarantee: str) -> None:
    """Under at_least_once it would make the publisher's producer transactional: every
    produce() outside a transaction fails."""
    message = config_error(
        minimal(processing={"guarantee": guarantee}, kafka={where: {"transactional.id": "x"}})
    )
    assert f"kafka.{where}.transactional.id: transactions are stream-infer's own" in message


@pytest.mark.parametrize("where", ["extra", "producer_extra"])
def test_the_same_properties_pass_under_at_least_once(where: str) -> None:
    t = topo(minimal(kafka={where: {"enable.idempotence": True}}))
    assert not t.processing.exactly_once


@pytest.mark.parametrize("where", ["extra", "producer_extra"])
def test_a_message_timeout_above_the_transaction_timeout_is_refused(where: str) -> None:
    data = eos(kafka={"transaction_timeout_ms": 20_000, where: {"message.timeout.ms": 20_001}})
    message = config_error(data)
    assert f"kafka.{where}.message.timeout.ms (20001) must not exceed" in message
    assert "kafka.transaction_timeout_ms (20000)" in message


def test_a_message_timeout_within_the_transaction_timeout_is_kept() -> None:
    t = topo(eos(kafka={"producer_extra": {"message.timeout.ms": 10_000}}))
    conf = transactional_producer_config(t.kafka, "tid")
    assert conf["message.timeout.ms"] == 10_000
    assert conf["transaction.timeout.ms"] == 10_000  # the default transaction timeout


def test_a_message_timeout_above_the_default_transaction_timeout_is_refused() -> None:
    message = config_error(eos(kafka={"extra": {"message.timeout.ms": "10001"}}))
    assert "kafka.extra.message.timeout.ms (10001) must not exceed" in message


def test_a_message_timeout_over_it_passes_under_at_least_once() -> None:
    t = topo(minimal(kafka={"producer_extra": {"message.timeout.ms": 60_000}}))
    assert producer_config(t.kafka)["message.timeout.ms"] == 60_000


@pytest.mark.parametrize(
    ("value", "fragment"),
    [(999, "greater than or equal to 1000"), (900_001, "less than or equal to 900000")],
)
def test_the_transaction_timeout_is_bounded(value: int, fragment: str) -> None:
    message = config_error(eos(kafka={"transaction_timeout_ms": value}))
    assert "kafka.transaction_timeout_ms: Input should be" in message and fragment in message


# --- the producer and consumer configurations --------------------------------------------------


def test_the_transactional_producer_config() -> None:
    t = topo(eos(kafka={"transaction_timeout_ms": 30_000}))
    conf = transactional_producer_config(t.kafka, "stream-infer.t.w1")
    assert conf["transactional.id"] == "stream-infer.t.w1"
    assert conf["transaction.timeout.ms"] == 30_000
    assert conf["retry.backoff.ms"] == 5
    assert conf["retry.backoff.max.ms"] == 5
    assert "message.timeout.ms" not in conf  # librdkafka bounds it by the transaction's
    assert conf["enable.idempotence"] is True and conf["acks"] == "all"
    plain = producer_config(t.kafka)
    assert plain["message.timeout.ms"] == 0  # what was removed: the plain producer keeps it
    assert "transactional.id" not in plain and "retry.backoff.ms" not in plain


@pytest.mark.parametrize("where", ["extra", "producer_extra"])
def test_the_users_retry_backoff_is_kept(where: str) -> None:
    t = topo(eos(kafka={where: {"retry.backoff.ms": 50}}))
    assert transactional_producer_config(t.kafka, "tid")["retry.backoff.ms"] == 50


def test_overrides_apply_last() -> None:
    t = topo(eos())
    conf = transactional_producer_config(t.kafka, "tid", linger_ms_marker=1)
    assert conf["linger_ms_marker"] == 1
    assert (
        transactional_producer_config(t.kafka, "tid", **{"retry.backoff.ms": 7})["retry.backoff.ms"]
        == 7
    )


def test_the_exactly_once_consumer_never_commits_itself_and_reads_committed() -> None:
    assert exactly_once_consumer_config() == {
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
    }


def test_the_exactly_once_consumer_properties_win_over_extra() -> None:
    """As the runtime builds it (overrides after kafka.extra): a topology cannot turn auto
    commit back on, nor read aborted records."""
    extra = {"enable.auto.commit": True, "isolation.level": "read_uncommitted"}
    t = topo(eos(kafka={"extra": extra}))
    conf = consumer_config(t.kafka, "g", **exactly_once_consumer_config())
    assert conf["enable.auto.commit"] is False
    assert conf["isolation.level"] == "read_committed"


# --- names ------------------------------------------------------------------------------------


def test_the_transactional_id_is_the_worker_id_when_set() -> None:
    t = topo(eos(worker={"id": "pod-1"}))
    assert t.transactional_id("host-123") == "stream-infer.t.pod-1"


def test_the_transactional_id_falls_back_without_a_worker_id() -> None:
    t = topo(eos())
    assert t.worker.id is None
    assert t.transactional_id("host-123") == "stream-infer.t.host-123"


def test_the_worker_id_from_the_env_names_the_transactional_id() -> None:
    t = topo(eos(), {"STREAM_INFER_WORKER__ID": "pod-7"})
    assert t.transactional_id("host-123") == "stream-infer.t.pod-7"


def test_the_probe_topic_is_named_after_the_control_topic() -> None:
    assert topo(eos()).transaction_probe_topic == "ctl.txn-probe"
