"""Client configurations and topic administration."""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from stream_infer.errors import BrokerError
from stream_infer.settings import KafkaSettings, Topology

log = logging.getLogger(__name__)


def consumer_config(kafka: KafkaSettings, group_id: str, **overrides: Any) -> dict[str, Any]:
    """A consumer that stores offsets only when told to (after delivery) and auto-commits those.

    ``enable.auto.offset.store=False`` + ``store_offsets`` after delivery is librdkafka's
    at-least-once pattern: the background commit can only ever commit what we stored.
    """
    conf = kafka.librdkafka() | {
        "logger": _RDKAFKA_LOG,
        "group.id": group_id,
        "enable.auto.commit": True,
        "enable.auto.offset.store": False,
        "auto.commit.interval.ms": 500,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": kafka.session_timeout_ms,
        "heartbeat.interval.ms": max(500, kafka.session_timeout_ms // 5),
        # Bound what librdkafka prefetches: backpressure must not turn into unbounded memory.
        "queued.max.messages.kbytes": 16 * 1024,
        # A fetch that finds no data waits at most 10 ms (librdkafka's default is 500 ms, and
        # tansu answers a waiting fetch only at its deadline). fetch.min.bytes stays at its
        # default (1 byte): 64 KiB was measured to double tansu's CPU and raise the p99.
        "fetch.wait.max.ms": 10,
    }
    return conf | kafka.extra | overrides


def producer_config(kafka: KafkaSettings, **overrides: Any) -> dict[str, Any]:
    """The workers' producer: every record acknowledged by all in-sync replicas.

    ``kafka.producer_extra`` applies to this producer only (after ``kafka.extra``), e.g. a
    shorter ``message.timeout.ms`` without touching the consumers.
    """
    conf = kafka.librdkafka() | {
        "logger": _RDKAFKA_LOG,
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 5,
        "batch.num.messages": 10_000,
        "queue.buffering.max.messages": 1_000_000,
        "compression.type": "none",
    }
    return conf | kafka.extra | kafka.producer_extra | overrides


def _admin(kafka: KafkaSettings, **overrides: Any) -> AdminClient:
    return AdminClient(kafka.librdkafka() | {"logger": _RDKAFKA_LOG} | overrides)


# librdkafka's own log lines go through Python logging, not straight to stderr.
_RDKAFKA_LOG = logging.getLogger("librdkafka")


def consume_ready(consumer: Consumer, max_records: int, timeout_s: float) -> list[Message]:
    """The records already fetched (up to ``max_records``) or, when there are none, the first
    to arrive within ``timeout_s``.

    librdkafka's ``consume(n, t)`` returns when it has ``n`` records or at ``t``, whichever
    first: used plainly at a low rate it adds ``t`` to every record's latency.
    """
    return consumer.consume(max_records, 0) or consumer.consume(1, timeout_s)


def ensure_topology_topics(topology: Topology) -> list[str]:
    """Create a topology's topics: the control log with one partition, the rest with N."""
    single = topology.topics.single_partition()
    rf = topology.topics.replication_factor
    # The control log is replayed by every starting worker: it must never expire.
    created = ensure_topics(
        topology.kafka,
        single,
        partitions=1,
        replication_factor=rf,
        config={"retention.ms": "-1", "retention.bytes": "-1"},
    )
    rest = [t for t in topology.all_topics() if t not in single]
    partitions = topology.topics.partitions
    return created + ensure_topics(
        topology.kafka, rest, partitions=partitions, replication_factor=rf
    )


def check_reachable(kafka: KafkaSettings, timeout_s: float | None = None) -> None:
    """Raise BrokerError with a clear message if the cluster cannot be reached."""
    timeout_s = kafka.connect_timeout_s if timeout_s is None else timeout_s
    try:
        # Quiet: connection failures are reported once, below, not per retry.
        _admin(kafka, log_level=0).list_topics(timeout=timeout_s)
    except KafkaException as exc:
        msg = (
            f"cannot reach Kafka at {kafka.bootstrap_servers} within {timeout_s:g}s "
            f"({exc.args[0].str() if exc.args else exc}). Is the broker running? Start the "
            "embedded one with `stream-infer broker`, or set kafka.bootstrap_servers "
            "(env STREAM_INFER_KAFKA__BOOTSTRAP_SERVERS)."
        )
        raise BrokerError(msg, bootstrap_servers=kafka.bootstrap_servers) from None


def ensure_topics(
    kafka: KafkaSettings,
    names: list[str],
    *,
    partitions: int,
    replication_factor: int,
    timeout_s: float = 15.0,
    config: dict[str, str] | None = None,
) -> list[str]:
    """Create the topics that do not exist yet, with explicit partition counts.

    Returns the names created. Existing topics are left as they are (their partition count is
    not changed; a mismatch is logged).
    """
    check_reachable(kafka, timeout_s)
    admin = _admin(kafka)
    existing = admin.list_topics(timeout=timeout_s).topics
    for name in names:
        if name in existing and len(existing[name].partitions) != partitions:
            log.warning(
                "topic %s exists with %d partitions, the topology asks for %d",
                name,
                len(existing[name].partitions),
                partitions,
            )
    wanted = [n for n in names if n not in existing]
    if not wanted:
        return []
    futures = admin.create_topics(
        [
            NewTopic(
                n,
                num_partitions=partitions,
                replication_factor=replication_factor,
                config=config or {},
            )
            for n in wanted
        ],
        operation_timeout=timeout_s,
        request_timeout=timeout_s,
    )
    created = []
    for name, fut in futures.items():
        try:
            fut.result(timeout=timeout_s)
            created.append(name)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            msg = f"cannot create topic {name!r}: {exc}"
            raise BrokerError(msg, bootstrap_servers=kafka.bootstrap_servers) from None
    log.info("created topics %s", created)
    return created
