"""Client configurations and topic administration."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ConfigResource,
    NewTopic,
    ResourceType,
)

from stream_infer.errors import BrokerError, ConfigError
from stream_infer.io.repeated_log import LibrdkafkaLog
from stream_infer.settings import PRODUCE_MARGIN_BYTES, KafkaSettings, Topology

log = logging.getLogger(__name__)


def consumer_config(kafka: KafkaSettings, group_id: str, **overrides: Any) -> dict[str, Any]:
    """A consumer that stores offsets only when told to (after delivery) and auto-commits those.

    ``enable.auto.offset.store=False`` + ``store_offsets`` after delivery is librdkafka's
    at-least-once pattern: the background commit can only ever commit what we stored.
    """
    conf = kafka.librdkafka() | {
        "logger": RDKAFKA_LOG,
        "group.id": group_id,
        "enable.auto.commit": True,
        "enable.auto.offset.store": False,
        "auto.commit.interval.ms": 500,
        "auto.offset.reset": "earliest",
        # librdkafka's default is 5 minutes: partitions added to a topic would wait that long.
        "topic.metadata.refresh.interval.ms": kafka.metadata_refresh_ms,
        # Bound what librdkafka prefetches: backpressure must not turn into unbounded memory.
        # 64 MiB, librdkafka's default: 16 MiB throttled large events (issue 16's feature
        # sweep: 2 KB events 11,883 -> 27,858 events/s, 8 KB 4,095 -> 7,604, for +20-60 MiB
        # RSS, 866-908 MiB at saturation).
        "queued.max.messages.kbytes": 64 * 1024,
        # How long a fetch that finds no data may wait (kafka.fetch_wait_max_ms): Apache Kafka
        # answers as soon as a record arrives, so it only paces an idle worker's fetches (tansu
        # holds every empty fetch until then). fetch.min.bytes stays at its default (1 byte):
        # 64 KiB was measured to double tansu's CPU and raise the p99.
        "fetch.wait.max.ms": kafka.fetch_wait_max_ms,
    }
    return conf | group_protocol_config(kafka) | kafka.extra | overrides


def groupless_consumer_config(conf: Mapping[str, Any], purpose: str) -> dict[str, Any]:
    """``conf`` for a consumer that joins no group: its partitions are assigned
    (:func:`assign_partitions`), never subscribed, and it commits nothing.

    librdkafka requires a ``group.id`` all the same: each such consumer gets one of its own,
    ``stream-infer-{purpose}-`` and a random suffix, so it shares no group with another. It
    reads committed records only (``isolation.level=read_committed``, librdkafka's default,
    pinned: under exactly_once an aborted batch's records are in the log too, and ``tail``
    and the demo's table must never show them).

    >>> conf = groupless_consumer_config({"bootstrap.servers": "kafka:9092"}, "watch")
    >>> conf["group.id"].startswith("stream-infer-watch-"), conf["enable.auto.commit"]
    (True, False)
    >>> conf["isolation.level"]
    'read_committed'
    """
    return dict(conf) | {
        "group.id": f"stream-infer-{purpose}-{uuid.uuid4().hex}",
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
    }


def assign_partitions(
    consumer: Consumer,
    partitions: Mapping[str, Iterable[int]],
    start: int | Callable[[str, int], int],
) -> list[TopicPartition]:
    """Assign these partitions of each topic to a consumer that joins no group, in one call (an
    assignment replaces the one before); return what was assigned.

    ``start``: where each partition is read from, a logical offset for all of them
    (``OFFSET_BEGINNING``, ``OFFSET_END``) or a function of (topic, partition).
    """
    assigned = [
        TopicPartition(topic, p, start if isinstance(start, int) else start(topic, p))
        for topic, numbers in partitions.items()
        for p in sorted(numbers)
    ]
    consumer.assign(assigned)
    return assigned


def group_protocol_config(kafka: KafkaSettings) -> dict[str, Any]:
    """The group protocol's properties. Both assign co-partitioned: partition i of the input
    and of the labels topic go to the same worker (the label join needs it; the consumer
    protocol's default assignor, uniform, spreads the two topics over different workers).

    With ``group.protocol=consumer`` the broker owns the session timeout, the heartbeat
    interval and the assignor list; librdkafka refuses the classic properties for them.
    """
    if kafka.group_protocol == "consumer":
        return {"group.protocol": "consumer", "group.remote.assignor": "range"}
    return {
        "partition.assignment.strategy": "range",
        "session.timeout.ms": kafka.session_timeout_ms,
        # A fifth of the session, at most librdkafka's 3 s: members learn of a rebalance
        # from a heartbeat, so a longer interval would lengthen every rebalance.
        "heartbeat.interval.ms": max(500, min(3_000, kafka.session_timeout_ms // 5)),
    }


def producer_config(kafka: KafkaSettings, **overrides: Any) -> dict[str, Any]:
    """The workers' producer: every record acknowledged by all in-sync replicas, in order.

    ``message.timeout.ms`` is 0 (no limit): librdkafka's idempotent producer retries a
    transient error itself, in order and without duplicates, for as long as it takes. With a
    finite timeout a record that timed out comes back to the publisher, which produces it
    again; but librdkafka goes on with the records after it meanwhile, so it may land behind
    newer records of its key. A delivery stuck for long is a /healthz problem
    (``limits.max_unacked_s``), not a silent wait.

    ``kafka.producer_extra`` applies to this producer only (after ``kafka.extra``), e.g. a
    finite ``message.timeout.ms`` without touching the consumers.
    """
    conf = kafka.librdkafka() | {
        "logger": RDKAFKA_LOG,
        "acks": "all",
        "enable.idempotence": True,
        "message.timeout.ms": 0,
        # Every record of a micro-batch is produced at once, so no wait is needed to fill a
        # request: 1 ms (was 5, which every prediction waited at low load; issue 16, item 5).
        "linger.ms": 1,
        "batch.num.messages": 10_000,
        "queue.buffering.max.messages": 1_000_000,
        "compression.type": "none",
        # A topic that refused Write stays errored in librdkafka until its metadata is
        # refreshed: a granted ACL then works within this long (the default is 300 s).
        "topic.metadata.refresh.interval.ms": kafka.metadata_refresh_ms,
    }
    return conf | kafka.extra | kafka.producer_extra | overrides


def exactly_once_consumer_config() -> dict[str, Any]:
    """What a consumer needs under exactly_once: its offsets move only inside the transactions
    (``send_offsets_to_transaction``), never by a commit of its own; and it reads committed
    records only (librdkafka's default, pinned: the input may itself be written in
    transactions, and the stable offset fetch of KIP-447 relies on it)."""
    return {"enable.auto.commit": False, "isolation.level": "read_committed"}


def transactional_producer_config(
    kafka: KafkaSettings, transactional_id: str, **overrides: Any
) -> dict[str, Any]:
    """The exactly_once producer: :func:`producer_config` plus a ``transactional.id``.

    ``message.timeout.ms`` is left to librdkafka, which bounds it by the transaction's own
    timeout (it refuses a larger one), and a record that cannot be delivered in a transaction
    aborts it anyway. ``retry.backoff.ms`` and ``retry.backoff.max.ms`` are 5: the coordinator
    answers the next transaction's first request with CONCURRENT_TRANSACTIONS while it still
    writes the last one's markers, and the client retries after this back-off, growing
    exponentially up to the max. Measured on one Apache Kafka 4.1.1 node, 150 serial
    transactions of 512 records with their offsets (mean / p99): librdkafka's defaults (100 ms,
    1 s) 87 / 128 ms; 5 ms with the default max 22 / 45 ms; 5 and 5: 16 / 38 ms; 1 and 1: 13 / 32
    ms (docs/design/exactly-once.md).
    """
    conf = producer_config(kafka)
    given = kafka.extra | kafka.producer_extra
    if "message.timeout.ms" not in given:
        del conf["message.timeout.ms"]
    for name in ("retry.backoff.ms", "retry.backoff.max.ms"):
        if name not in given:
            conf[name] = 5
    return (
        conf
        | {
            "transactional.id": transactional_id,
            "transaction.timeout.ms": kafka.transaction_timeout_ms,
        }
        | overrides
    )


def _admin(kafka: KafkaSettings, **overrides: Any) -> AdminClient:
    return AdminClient(kafka.librdkafka() | {"logger": RDKAFKA_LOG} | overrides)


# librdkafka's own log lines go through Python logging (the "librdkafka" logger), not straight
# to stderr; a line repeated (a connection refused 20 times a second during an outage) is logged
# once per kind and interval, with a count. One for the process: the worker's report timer
# flushes the counts of kinds that stopped.
RDKAFKA_LOG = LibrdkafkaLog(logging.getLogger("librdkafka"))


def consume_ready(consumer: Consumer, max_records: int, timeout_s: float) -> list[Message]:
    """The records already fetched (up to ``max_records``) or, when there are none, the first
    to arrive within ``timeout_s``.

    librdkafka's ``consume(n, t)`` returns when it has ``n`` records or at ``t``, whichever
    first: used plainly at a low rate it adds ``t`` to every record's latency.
    """
    return consumer.consume(max_records, 0) or consumer.consume(1, timeout_s)


def ensure_topology_topics(
    topology: Topology, timeout_s: float = 15.0, *, refuse_copartition: bool = False
) -> list[str]:
    """Create a topology's topics (the control log with one partition and infinite retention,
    the rest with N), then check the ones that existed: see :func:`check_topology_topics`."""
    single = topology.topics.single_partition()
    rf = topology.topics.replication_factor
    # The control log is replayed by every starting worker: it must never expire. Commands
    # with a maximum age are checked against the broker's time of writing.
    config = dict(CONTROL_TOPIC_CONFIG)
    if topology.control.max_command_age_s is not None:
        config["message.timestamp.type"] = LOG_APPEND_TIME
    created = ensure_topics(
        topology.kafka,
        single,
        partitions=1,
        replication_factor=rf,
        config=config,
        timeout_s=timeout_s,
    )
    if topology.processing.exactly_once:
        created += ensure_topics(
            topology.kafka,
            [topology.transaction_probe_topic],
            partitions=1,
            replication_factor=rf,
            config={"retention.ms": str(3_600_000)},
            timeout_s=timeout_s,
        )
    rest = [t for t in topology.all_topics() if t not in single]
    partitions = topology.topics.partitions
    dead_letter = topology.topics.dead_letter
    needed = dead_letter_max_message_bytes(topology)
    if needed > KAFKA_MAX_MESSAGE_BYTES:  # Apache Kafka's default would refuse the largest
        created += ensure_topics(
            topology.kafka,
            [dead_letter],
            partitions=partitions,
            replication_factor=rf,
            config={"max.message.bytes": str(needed)},
            timeout_s=timeout_s,
        )
        rest.remove(dead_letter)
    created += ensure_topics(
        topology.kafka, rest, partitions=partitions, replication_factor=rf, timeout_s=timeout_s
    )
    admin = _admin(topology.kafka)
    checked = check_topology_topics(
        topology, admin, timeout_s, refuse_copartition=refuse_copartition
    )
    for warning in checked:
        log.warning("%s", warning)
    return created


# How much longer than its request an admin future is waited for (librdkafka fails the future
# at the request timeout; this is only for one it never answers).
FUTURE_GRACE_S = 5.0

# What the control topic is created with: the log is the routing's only memory.
CONTROL_TOPIC_CONFIG = {"retention.ms": "-1", "retention.bytes": "-1"}
LOG_APPEND_TIME = "LogAppendTime"


def check_topology_topics(
    topology: Topology, admin: Any, timeout_s: float = 15.0, *, refuse_copartition: bool = False
) -> list[str]:
    """Refuse topics a worker of ``topology`` cannot run on; return warnings about the rest.

    Raises :class:`ConfigError` when the control topic would lose commands (more than one
    partition, or a finite retention under ``cleanup.policy=delete``). Input and labels topics
    of a topology that joins labels with different partition counts are refused only with
    ``refuse_copartition`` (``stream-infer topics``, where the operator makes the topics);
    otherwise (a worker starting) they are logged at ERROR: the worker serves, as a running
    one does when it sees them, and ``/healthz`` warns (after a scale-out of the input topic
    alone every restarted worker exiting would turn the next rollout into an outage). Refuses a
    compacted control topic (only the last record per key survives, and copies of a command
    share a key), and one whose timestamps are not the broker's when commands have a maximum
    age. Warns when its configuration cannot be read. ``admin`` is an :class:`AdminClient`
    (or a fake of one).
    """
    meta = admin.list_topics(timeout=timeout_s).topics
    counts = {name: len(t.partitions) for name, t in meta.items() if t.error is None}
    topics = topology.topics
    if topology.online.enabled and topics.labels:
        problem = copartition_problem(counts, topics.input, topics.labels)
        if problem and refuse_copartition:
            raise ConfigError(problem)
        if problem:
            log.error("labels cannot be joined: %s", problem)
    if topics.dead_letter in counts:
        warnings = _check_dead_letter_config(admin, topology, timeout_s)
    else:
        warnings = []
    control = topics.control
    if control not in counts:
        return warnings
    if counts[control] != 1:
        msg = (
            f"control topic {control!r} has {counts[control]} partitions, expected 1: commands "
            "in different partitions have no order between them, and workers would reach "
            "different routings. Partitions cannot be removed: create a new control topic with "
            "one partition (`stream-infer topics` does) and set topics.control to it"
        )
        raise ConfigError(msg)
    max_age_s = topology.control.max_command_age_s
    return warnings + _check_control_config(admin, control, timeout_s, max_age_s=max_age_s)


# Apache Kafka's default max.message.bytes (the largest record batch a topic accepts).
KAFKA_MAX_MESSAGE_BYTES = 1_048_588


def dead_letter_max_message_bytes(topology: Topology) -> int:
    """The max.message.bytes the dead-letter topic needs for the largest dead letter."""
    return topology.limits.max_dead_letter_bytes + PRODUCE_MARGIN_BYTES


def _topic_config(admin: Any, topic: str, timeout_s: float) -> dict[str, str | None]:
    """A topic's configuration as the broker reports it. Raises KafkaException/TimeoutError."""
    resource = ConfigResource(ResourceType.TOPIC, topic)
    future = admin.describe_configs([resource], request_timeout=timeout_s)[resource]
    # Longer than the request: librdkafka answers the future by its own timeout. A future
    # still unanswered raises TimeoutError (Python >= 3.11), not KafkaException.
    entries = future.result(timeout=timeout_s + FUTURE_GRACE_S)
    return {name: entry.value for name, entry in entries.items()}


def output_max_message_bytes(topology: Topology, timeout_s: float = 15.0) -> dict[str, int]:
    """Each topic the workers produce to, with its max.message.bytes as the broker reports it
    (a topic whose configuration cannot be read, or a broker that does not report it, is left
    out: nothing is known of it)."""
    admin = _admin(topology.kafka)
    inputs = {topology.topics.input, topology.topics.labels}
    limits: dict[str, int] = {}
    for topic in topology.all_topics():
        if topic in inputs:
            continue
        try:
            value = _topic_config(admin, topic, timeout_s).get("max.message.bytes")
        except (KafkaException, TimeoutError):
            continue
        if value is not None and value.isdigit():
            limits[topic] = int(value)
    return limits


def producer_batch_bytes(conf: Mapping[str, Any], limits: Mapping[str, int]) -> int | None:
    """The producer's ``batch.size`` that keeps every record batch under the smallest topic's
    max.message.bytes (the broker judges a whole batch, and refuses every record of one that
    is too large); None when the configured one already does."""
    if not limits:
        return None
    configured = int(conf.get("batch.size", LIBRDKAFKA_BATCH_BYTES))
    fitting = max(1, min(limits.values()) - RECORD_BATCH_OVERHEAD_BYTES)
    return fitting if fitting < configured else None


# librdkafka's default batch.size.
LIBRDKAFKA_BATCH_BYTES = 1_000_000
# What a record batch adds to its records (its header is 61 bytes; per-record framing).
RECORD_BATCH_OVERHEAD_BYTES = 128


def framed_size(key: bytes | None, value: bytes) -> int:
    """A record's bytes alone in a record batch, as a topic's max.message.bytes judges them
    (with :data:`RECORD_BATCH_OVERHEAD_BYTES` of framing).

    >>> framed_size(b"k", b"12345")
    134
    """
    return len(key or b"") + len(value) + RECORD_BATCH_OVERHEAD_BYTES


def _check_dead_letter_config(admin: Any, topology: Topology, timeout_s: float) -> list[str]:
    """Refuse a dead-letter topic whose max.message.bytes is below the largest dead letter:
    its dead letters would be refused (MSG_SIZE_TOO_LARGE) and their batches never done."""
    topic = topology.topics.dead_letter
    needed = dead_letter_max_message_bytes(topology)
    try:
        config = _topic_config(admin, topic, timeout_s)
    except (KafkaException, TimeoutError) as exc:
        return [
            f"cannot read the configuration of dead-letter topic {topic!r} ({exc}): check "
            f"that its max.message.bytes is at least {needed}"
        ]
    value = config.get("max.message.bytes")
    if value is None or not value.isdigit() or int(value) >= needed:
        return []
    msg = (
        f"dead-letter topic {topic!r} has max.message.bytes={value}, below the {needed} bytes "
        f"a dead letter may take (limits.max_dead_letter_bytes="
        f"{topology.limits.max_dead_letter_bytes}, plus {PRODUCE_MARGIN_BYTES} of framing): "
        "the broker would refuse the largest dead letters. Raise it (kafka-configs.sh "
        f"--bootstrap-server ... --alter --entity-type topics --entity-name {topic} "
        f"--add-config max.message.bytes={needed}) or lower limits.max_dead_letter_bytes"
    )
    raise ConfigError(msg)


def copartition_problem(counts: Mapping[str, int], input_topic: str, labels: str) -> str | None:
    """Why the label join cannot work on these partition counts (None when it can, or when a
    topic is not known yet)."""
    n_input, n_labels = counts.get(input_topic), counts.get(labels)
    if n_input is None or n_labels is None or n_input == n_labels:
        return None
    more, fewer = (input_topic, labels) if n_input > n_labels else (labels, input_topic)
    return (
        f"the input topic {input_topic!r} has {n_input} partitions and the labels topic "
        f"{labels!r} has {n_labels}: the label join needs both partitioned alike (the same key "
        f"in the same partition number of both, owned by one worker). Add partitions to "
        f"{fewer!r} to match {more!r} (kafka-topics.sh --alter --topic {fewer} --partitions "
        f"{max(n_input, n_labels)}), or give the topology a new labels topic. Until then "
        f"events are served, but a label whose key lands in another partition number than its "
        f"event's reaches another worker and is never joined (the event counts in "
        f"stream_infer_labels_missed_total): the learners learn from the rest only"
    )


def _check_control_config(
    admin: Any, topic: str, timeout_s: float, *, max_age_s: float | None = None
) -> list[str]:
    try:
        config = _topic_config(admin, topic, timeout_s)
    except (KafkaException, TimeoutError) as exc:
        return [
            f"cannot read the configuration of control topic {topic!r} ({exc}): check "
            "that it has retention.ms=-1 and retention.bytes=-1"
        ]
    policy = {p.strip() for p in (config.get("cleanup.policy") or "delete").split(",")}
    fix = (
        f"kafka-configs.sh --bootstrap-server ... --alter --entity-type topics --entity-name "
        f"{topic} --add-config retention.ms=-1,retention.bytes=-1"
    )
    if "delete" in policy:
        missing = [k for k in CONTROL_TOPIC_CONFIG if k not in config]
        if missing:
            return [
                f"control topic {topic!r}: the broker did not report {', '.join(missing)}; "
                f"check that its retention is infinite ({fix})"
            ]
        finite = {k: config[k] for k in CONTROL_TOPIC_CONFIG if not _infinite(config[k])}
        if finite:
            said = ", ".join(f"{k}={v}" for k, v in finite.items())
            msg = (
                f"control topic {topic!r} has {said} with cleanup.policy="
                f"{config.get('cleanup.policy') or 'delete'}: commands would be deleted, and "
                "every worker started afterwards would rebuild its routing without them. Make "
                f"its retention infinite: {fix}"
            )
            raise ConfigError(msg)
    if "compact" in policy:
        msg = (
            f"control topic {topic!r} is compacted: only the last record of each key is kept, "
            "and copies of one command share a key (drift policies send one from every worker "
            "that sees the drift; a client may retry a send), so a worker started after "
            "compaction would rebuild another routing than one that read the copies in order. "
            f"Make it cleanup.policy=delete with infinite retention: kafka-configs.sh "
            f"--bootstrap-server ... --alter --entity-type topics --entity-name {topic} "
            "--add-config cleanup.policy=delete,retention.ms=-1,retention.bytes=-1"
        )
        raise ConfigError(msg)
    if max_age_s is not None and config.get("message.timestamp.type") != LOG_APPEND_TIME:
        msg = (
            f"control.max_command_age_s is set, and control topic {topic!r} has "
            f"message.timestamp.type={config.get('message.timestamp.type')}: a command's age "
            "is checked against the time the broker wrote it, which only LogAppendTime makes "
            "the broker's (with CreateTime the sender chooses it). kafka-configs.sh "
            f"--bootstrap-server ... --alter --entity-type topics --entity-name {topic} "
            f"--add-config message.timestamp.type={LOG_APPEND_TIME}"
        )
        raise ConfigError(msg)
    return []


def _infinite(value: str | None) -> bool:
    """-1, or a limit no topic reaches: 9223372036854775807 (Long.MAX_VALUE) is a common
    "infinite" retention; anything from 2**62 (146 million years in ms, 4 EiB) counts."""
    try:
        n = int(value or "")
    except ValueError:
        return False
    return n == -1 or n >= 2**62


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


def missing_topics(kafka: KafkaSettings, names: list[str], timeout_s: float = 15.0) -> list[str]:
    """The topics among ``names`` the cluster does not have. Asked through the admin client,
    whose metadata requests never auto-create a topic."""
    existing = _admin(kafka).list_topics(timeout=timeout_s).topics
    return [n for n in names if n not in existing]


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
            if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
                # A topic this principal may not describe is hidden from it, so it looks missing.
                msg = (
                    f"topic {name!r} is not visible to this principal and creating it was refused "
                    f"({err.name()}): grant Describe on it (Read and Write include Describe), "
                    "or Create to let it be created (docs/production.md, Kafka ACLs)"
                )
            raise BrokerError(msg, bootstrap_servers=kafka.bootstrap_servers) from None
    log.info("created topics %s", created)
    return created
