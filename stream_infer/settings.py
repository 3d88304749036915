"""The one configuration object: a topology file plus environment overrides, validated and frozen.

A topology is YAML (see topologies/ and the README). Any field can be overridden from the
environment with ``STREAM_INFER_<SECTION>__<FIELD>``; for example
``STREAM_INFER_KAFKA__BOOTSTRAP_SERVERS=broker:9092``, or ``STREAM_INFER_<FIELD>`` for a
top-level field (``STREAM_INFER_DEVICE=cpu``). Other ``STREAM_INFER_*`` variables are not
overrides (dev.py's ``STREAM_INFER_TORCH_SPEC``); an invalid override is reported under the
variable's name. This is the only module that reads the environment.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from stream_infer.errors import ConfigError
from stream_infer.inference import DEVICES, parse_device
from stream_infer.online import LearnerKind, PolicyAction, parse_signal

ENV_PREFIX = "STREAM_INFER_"
_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# librdkafka properties that follow from kafka.group_protocol (not settable through extra), and
# those librdkafka refuses with group.protocol=consumer (the broker owns them there).
_GROUP_OWNED = ("group.protocol", "group.remote.assignor", "partition.assignment.strategy")
_CLASSIC_ONLY = ("session.timeout.ms", "heartbeat.interval.ms", "group.protocol.type")
# librdkafka partitioners that send every record of a key to the same partition ("random" does
# not; the *_random ones randomise only records without a key).
KEYED_PARTITIONERS = (
    "consistent_random",
    "consistent",
    "murmur2_random",
    "murmur2",
    "fnv1a_random",
    "fnv1a",
)


class KafkaSettings(_Frozen):
    """How every client (faust and confluent-kafka alike) reaches the cluster."""

    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str | None = Field(
        default=None, description="consumer group of the workers; default: stream-infer.<name>"
    )
    client_id: str = "stream-infer"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_location: str | None = None
    ssl_certificate_location: str | None = None
    ssl_key_location: str | None = None
    group_protocol: Literal["classic", "consumer"] = Field(
        default="classic",
        description="the consumer group protocol: classic (JoinGroup/SyncGroup, eager range "
        "assignment) or consumer (KIP-848, Kafka 4.0+: the broker assigns, incrementally)",
    )
    session_timeout_ms: int = Field(
        # 30 s outlasts a group coordinator's failover on Apache Kafka (its brokers' own 9 s
        # session, then leader election): at 10 s a SIGKILLed coordinator cost the group its
        # session in 4 of 6 kills (docs/production.md, When a broker dies). A crashed worker's
        # partitions move after this long; a stopped one leaves the group at once.
        default=30_000,
        ge=1_000,
        le=300_000,
        description="classic protocol only (with consumer, the broker's "
        "group.consumer.session.timeout.ms decides)",
    )
    metadata_refresh_ms: int = Field(
        default=30_000,
        ge=1_000,
        le=3_600_000,
        description="how often the workers' clients refresh topic metadata: partitions added "
        "to a topic are consumed within about this long",
    )
    fetch_wait_max_ms: int = Field(
        default=100,
        ge=1,
        le=5_000,
        description="how long the broker may hold a fetch that finds no new record "
        "(fetch.wait.max.ms). Apache Kafka answers a fetch as soon as a record arrives, so this "
        "only paces an idle worker's fetches (10 a second at 100 ms); a metadata or offsets "
        "request sent on the same connection meanwhile may wait up to this long behind it. "
        "tansu holds every empty fetch this long, so its demo sets 10",
    )
    connect_timeout_s: float = Field(
        default=10.0, gt=0.0, le=300.0, description="how long to wait for the cluster at start"
    )
    extra: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="further librdkafka properties, passed through"
    )
    producer_extra: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="librdkafka properties for the workers' producer only, applied after extra",
    )
    transaction_timeout_ms: int = Field(
        default=10_000,
        ge=1_000,
        le=900_000,
        description="processing.guarantee exactly_once only: how long a transaction may stay "
        "open before the broker aborts it. It bounds how long a crashed or frozen worker's "
        "open transaction holds back read_committed readers of its output partitions and the "
        "next owner of its input partitions; a transaction that outlasts it (a broker failover "
        "slower than it) is aborted, and the worker restarts. At most the brokers' "
        "transaction.max.timeout.ms (Apache Kafka's default: 900000)",
    )

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL") and not (
            self.sasl_mechanism and self.sasl_username and self.sasl_password
        ):
            msg = (
                f"security_protocol {self.security_protocol} needs sasl_mechanism, "
                "sasl_username and sasl_password"
            )
            raise ValueError(msg)
        return self

    @model_validator(mode="after")
    def _partitioner_keeps_keys(self) -> KafkaSettings:
        """A keyed record must land on the partition its key names, always: the label join
        (labels keyed like their events) and per-key order depend on it."""
        for where, conf in (("extra", self.extra), ("producer_extra", self.producer_extra)):
            value = conf.get("partitioner")
            if value is not None and value not in KEYED_PARTITIONERS:
                msg = (
                    f"kafka.{where}.partitioner={value!r} does not map a key to one partition "
                    f"every time; use one of {', '.join(KEYED_PARTITIONERS)} (murmur2_random is "
                    "the Java client's partitioner)"
                )
                raise ValueError(msg)
        return self

    @model_validator(mode="after")
    def _group_protocol_consistent(self) -> KafkaSettings:
        where = next((k for k in self.extra if k in _GROUP_OWNED), None)
        if where is not None:
            msg = (
                f"extra.{where} is set by stream-infer from kafka.group_protocol "
                f"({self.group_protocol}); the label join needs co-partitioned (range) "
                "assignment: remove it"
            )
            raise ValueError(msg)
        if self.group_protocol != "consumer":
            return self
        classic_only = [k for k in self.extra if k in _CLASSIC_ONLY]
        if "session_timeout_ms" in self.model_fields_set:
            classic_only.insert(0, "session_timeout_ms")
        if classic_only:
            msg = (
                f"{', '.join(classic_only)}: classic-protocol settings, refused with "
                "group_protocol consumer (the broker's group.consumer.session.timeout.ms and "
                "group.consumer.heartbeat.interval.ms decide): remove them"
            )
            raise ValueError(msg)
        return self

    def librdkafka(self) -> dict[str, Any]:
        """Connection and security properties in librdkafka's names (no group settings)."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": self.client_id,
            "security.protocol": self.security_protocol,
        }
        optional = {
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_username,
            "sasl.password": self.sasl_password.get_secret_value() if self.sasl_password else None,
            "ssl.ca.location": self.ssl_ca_location,
            "ssl.certificate.location": self.ssl_certificate_location,
            "ssl.key.location": self.ssl_key_location,
        }
        conf.update({k: v for k, v in optional.items() if v is not None})
        conf.update(self.extra)
        return conf


class TopicSettings(_Frozen):
    input: str
    predictions: str
    dead_letter: str
    control: str
    acks: str | None = None
    shadow: str | None = None
    labels: str | None = None
    drift: str | None = None
    partitions: int = Field(default=4, ge=1, le=10_000)
    replication_factor: int = Field(default=1, ge=1, le=16)

    @field_validator("*", mode="after")
    @classmethod
    def _topic_name(cls, value: Any) -> Any:
        if isinstance(value, str) and not _TOPIC_RE.match(value):
            msg = f"{value!r} is not a valid Kafka topic name (letters, digits, '.', '_', '-')"
            raise ValueError(msg)
        return value

    def single_partition(self) -> list[str]:
        """Topics that must have one partition: the control log is totally ordered."""
        return [t for t in (self.control, self.acks) if t]

    def all_names(self) -> list[str]:
        names = [self.input, self.predictions, self.dead_letter, self.control]
        names += [t for t in (self.acks, self.shadow, self.labels, self.drift) if t]
        return list(dict.fromkeys(names))


class VersionSettings(_Frozen):
    version: str
    path: Path = Field(description="directory holding meta.json and the artifact")

    @field_validator("version")
    @classmethod
    def _version_name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            msg = f"{value!r} is not a valid version name (letters, digits, '.', '_', '-')"
            raise ValueError(msg)
        return value


class ModelSettings(_Frozen):
    name: str
    serving: str = Field(description="the version that serves when no control command says else")
    versions: tuple[VersionSettings, ...] = Field(min_length=1)
    prediction_topic: str | None = Field(
        default=None, description="where this model's predictions go; default topics.predictions"
    )

    @model_validator(mode="after")
    def _serving_known(self) -> ModelSettings:
        names = [v.version for v in self.versions]
        if len(set(names)) != len(names):
            msg = f"model {self.name!r} declares a version twice: {names}"
            raise ValueError(msg)
        if self.serving not in names:
            msg = f"serving version {self.serving!r} is not among the versions {names}"
            raise ValueError(msg)
        return self

    def version(self, name: str) -> VersionSettings | None:
        return next((v for v in self.versions if v.version == name), None)


class BatchingSettings(_Frozen):
    max_batch_size: int = Field(default=512, ge=1, le=100_000)
    max_wait_ms: float = Field(default=10.0, ge=0.0, le=60_000.0)
    max_batches_in_flight: int = Field(
        default=4, ge=1, le=64, description="batches consumed but not yet committed (backpressure)"
    )


# librdkafka properties stream-infer sets itself under exactly_once: a topology may not.
_TRANSACTION_OWNED = ("transactional.id", "enable.idempotence", "transaction.timeout.ms")


class ProcessingSettings(_Frozen):
    guarantee: Literal["at_least_once", "exactly_once"] = Field(
        default="at_least_once",
        description="at_least_once: an input offset is committed after every record produced "
        "for it is acknowledged; a crash may serve records again (consumers deduplicate by "
        "id). exactly_once (Apache Kafka >= 2.5): each micro-batch's records and its input "
        "offsets are one Kafka transaction; read the outputs with isolation.level="
        "read_committed",
    )

    @property
    def exactly_once(self) -> bool:
        return self.guarantee == "exactly_once"


class LimitSettings(_Frozen):
    max_event_bytes: int = Field(default=64 * 1024, ge=64, le=16 * 1024 * 1024)
    max_dead_letter_bytes: int = Field(
        default=512 * 1024,
        ge=16 * 1024,
        le=16 * 1024 * 1024,
        description=(
            "most bytes a dead letter's key and value take: a payload that would not fit is "
            "cut (raw_truncated). At most the producer's message.max.bytes (librdkafka's "
            "default 1000000) and the dead-letter topic's max.message.bytes"
        ),
    )
    inference_timeout_s: float = Field(
        default=30.0,
        gt=0.0,
        le=3600.0,
        description="a model call that takes longer dead-letters its events as model_timeout",
    )
    max_hung_calls: int = Field(
        default=8,
        ge=1,
        le=1000,
        description="hung calls per version after which its calls are refused and /healthz fails",
    )
    max_unacked_s: float = Field(
        default=300.0,
        gt=0.0,
        le=86_400.0,
        description=(
            "/healthz fails once the oldest batch (or ack) the broker has not acknowledged has "
            "waited this long (deliveries stuck: brokers unreachable, records retried without "
            "end), except while Kafka refuses a permission or the cluster is unreachable "
            "(warnings: a restart grants none, and brings no broker back)"
        ),
    )
    unreachable_grace_s: float = Field(
        default=30.0,
        gt=0.0,
        le=86_400.0,
        description=(
            "/readyz answers 503 (and /healthz warns, still 200) once the worker's clients "
            "have reached no broker for this long; ready again at the first broker's answer"
        ),
    )

    @model_validator(mode="after")
    def _grace_before_stall(self) -> LimitSettings:
        """An outage must be said (a warning) before stuck deliveries fail /healthz: else
        every outage longer than max_unacked_s restarts the pod, into a cluster it cannot
        reach (a restart loop no restart mends)."""
        if self.unreachable_grace_s >= self.max_unacked_s:
            msg = (
                f"unreachable_grace_s ({self.unreachable_grace_s:g}) must be shorter than "
                f"max_unacked_s ({self.max_unacked_s:g})"
            )
            raise ValueError(msg)
        return self


class WorkerSettings(_Frozen):
    web_port: int = Field(default=6066, ge=1, le=65535, description="metrics and health")
    web_host: str = "127.0.0.1"
    inference_threads: int = Field(default=1, ge=1, le=256, description="torch intra-op threads")
    id: str | None = Field(
        default=None,
        description="this worker's stable identity (e.g. the pod name, from the downward API: "
        "STREAM_INFER_WORKER__ID); names its learner snapshot files; default: the host name",
    )
    state_dir: Path = Field(
        default=Path(tempfile.gettempdir()) / "stream-infer" / "state",
        description="where the worker keeps its local state (faust's data folder, one per "
        "topology name): never the working directory",
    )

    @field_validator("id")
    @classmethod
    def _worker_id(cls, value: str | None) -> str | None:
        if value is not None and not _NAME_RE.match(value):
            msg = f"{value!r} is not a valid worker id (1 to 64 letters, digits, '.', '_', '-')"
            raise ValueError(msg)
        return value


class ControlSettings(_Frozen):
    hmac_key: SecretStr | None = Field(
        default=None,
        description="when set, every control command must carry a valid HMAC-SHA256 signature",
    )
    max_command_age_s: float | None = Field(
        default=None,
        gt=0.0,
        description=(
            "when set, a command must carry issued_at within this many seconds of its control "
            "record's Kafka timestamp (reason expired); give the control topic "
            "message.timestamp.type=LogAppendTime"
        ),
    )


class LearnerSettings(_Frozen):
    """An online River learner that serves as one more version of a declared model."""

    model: str
    version: str = "online"
    kind: LearnerKind = "logistic_regression"
    scale: bool = Field(default=True, description="StandardScaler before a linear model")
    warmup_labels: int = Field(
        default=200,
        ge=0,
        description=(
            "labels the learner learns (from its start or last reset) before its error and "
            "prediction monitors count it"
        ),
    )


class MonitorSettings(_Frozen):
    """An ADWIN drift monitor on every version's stream of one signal."""

    signal: str = Field(description="error | prediction | feature:<name>")
    delta: float = Field(default=0.002, gt=0.0, lt=1.0)
    grace: int = Field(default=0, ge=0, description="values after an alarm with alarms muted")
    sample_every: int = Field(default=1, ge=1, description="feed every k-th value (high rates)")

    @field_validator("signal")
    @classmethod
    def _signal(cls, value: str) -> str:
        parse_signal(value)
        return value


class PolicySettings(_Frozen):
    """What to do when a monitor of ``signal`` reports drift."""

    signal: str
    action: PolicyAction
    model: str | None = Field(default=None, description="only for this model; default all")
    online_version: str | None = Field(
        default=None, description="the learner version for shift_to_online / reset_learner"
    )


class OnlineSettings(_Frozen):
    learners: tuple[LearnerSettings, ...] = ()
    monitors: tuple[MonitorSettings, ...] = ()
    policies: tuple[PolicySettings, ...] = ()
    label_ttl_s: float = Field(default=3600.0, gt=0.0, description="how long an event waits")
    max_pending: int = Field(default=200_000, ge=1, description="events and early labels kept")
    metrics_window: int = Field(default=1000, ge=1, description="rolling prequential window")
    snapshot_dir: Path | None = Field(default=None, description="learner snapshots; none: off")
    snapshot_interval_s: float = Field(default=60.0, gt=0.0)
    rollouts: bool = Field(
        default=False,
        description="join labels for label-driven rollouts even without learners or monitors",
    )

    @property
    def enabled(self) -> bool:
        return bool(self.learners or self.monitors or self.rollouts)


# What a record's framing may add to its key and value (record headers, batch header).
PRODUCE_MARGIN_BYTES = 1024


class Topology(_Frozen):
    """A validated topology: everything a worker needs to run."""

    name: str
    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings
    features: tuple[str, ...] = Field(min_length=1)
    models: tuple[ModelSettings, ...] = Field(min_length=1)
    batching: BatchingSettings = BatchingSettings()
    processing: ProcessingSettings = ProcessingSettings()
    limits: LimitSettings = LimitSettings()
    worker: WorkerSettings = WorkerSettings()
    control: ControlSettings = ControlSettings()
    online: OnlineSettings = OnlineSettings()
    device: str = Field(default="auto", description=DEVICES)

    @model_validator(mode="before")
    @classmethod
    def _exactly_once_defaults(cls, data: Any) -> Any:
        """Under exactly_once, ``batching.max_batches_in_flight`` defaults to 2: one batch in
        its transaction, one being computed. A third could only wait for the transaction
        before it, and every batch after an aborted one is read and served again."""
        if not isinstance(data, Mapping):
            return data
        processing = data.get("processing")
        guarantee = processing.get("guarantee") if isinstance(processing, Mapping) else None
        batching = data.get("batching", {})
        if (
            guarantee == "exactly_once"
            and isinstance(batching, Mapping)
            and "max_batches_in_flight" not in batching
        ):
            return dict(data) | {"batching": dict(batching) | {"max_batches_in_flight": 2}}
        return data

    @model_validator(mode="after")
    def _exactly_once_consistent(self) -> Topology:
        kafka = self.kafka
        for where, conf in (("extra", kafka.extra), ("producer_extra", kafka.producer_extra)):
            if "transactional.id" in conf:  # every produce outside a transaction would fail
                msg = (
                    f"kafka.{where}.transactional.id: transactions are stream-infer's own "
                    "(processing.guarantee exactly_once gives each worker its id): remove it"
                )
                raise ValueError(msg)
        if not self.processing.exactly_once:
            return self
        for where, conf in (("extra", kafka.extra), ("producer_extra", kafka.producer_extra)):
            owned = next((k for k in conf if k in _TRANSACTION_OWNED), None)
            if owned is not None:
                msg = (
                    f"kafka.{where}.{owned} is set by stream-infer under processing.guarantee "
                    "exactly_once (the transaction timeout is kafka.transaction_timeout_ms): "
                    "remove it"
                )
                raise ValueError(msg)
            timeout = conf.get("message.timeout.ms")
            if timeout is not None and int(timeout) > kafka.transaction_timeout_ms:
                msg = (
                    f"kafka.{where}.message.timeout.ms ({timeout}) must not exceed "
                    f"kafka.transaction_timeout_ms ({kafka.transaction_timeout_ms}) under "
                    "exactly_once (librdkafka refuses it)"
                )
                raise ValueError(msg)
        return self

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            msg = f"{value!r} is not a valid topology name (letters, digits, '.', '_', '-')"
            raise ValueError(msg)
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        parse_device(value)
        return value

    @field_validator("features")
    @classmethod
    def _unique_features(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            msg = "feature names must be unique"
            raise ValueError(msg)
        return value

    @model_validator(mode="after")
    def _unique_models(self) -> Topology:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            msg = f"model names must be unique, got {names}"
            raise ValueError(msg)
        return self

    @model_validator(mode="after")
    def _limits_fit(self) -> Topology:
        """A dead letter must fit in what the producer may send, or it could never leave."""
        name = "message.max.bytes"
        limit = self.kafka.producer_extra.get(name, self.kafka.extra.get(name, 1_000_000))
        try:
            limit = int(limit)
        except (TypeError, ValueError):
            msg = f"kafka {name} must be a number of bytes, got {limit!r}"
            raise ValueError(msg) from None
        # librdkafka refuses a record whose key plus value exceeds message.max.bytes; the
        # record's framing comes on top: keep a margin for it.
        if self.limits.max_dead_letter_bytes > limit - PRODUCE_MARGIN_BYTES:
            msg = (
                f"limits.max_dead_letter_bytes={self.limits.max_dead_letter_bytes} does not "
                f"fit in the producer's {name}={limit} (minus {PRODUCE_MARGIN_BYTES} bytes of "
                f"framing): lower it, or raise {name} in kafka.producer_extra (and the "
                "dead-letter topic's max.message.bytes with it)"
            )
            raise ValueError(msg)
        return self

    @model_validator(mode="after")
    def _online_consistent(self) -> Topology:
        online = self.online
        for learner in online.learners:
            model = self.model(learner.model)
            if model is None:
                msg = f"online learner for unknown model {learner.model!r}"
                raise ValueError(msg)
            if model.version(learner.version) is not None:
                msg = f"online learner version {learner.version!r} clashes with a declared one"
                raise ValueError(msg)
        for monitor in online.monitors:
            feature = monitor.signal.removeprefix("feature:")
            if monitor.signal.startswith("feature:") and feature not in self.features:
                msg = f"monitor on unknown feature {feature!r}"
                raise ValueError(msg)
        needs_labels = bool(online.learners) or any(m.signal == "error" for m in online.monitors)
        if needs_labels and not self.topics.labels:
            msg = "online learners and error monitors need topics.labels"
            raise ValueError(msg)
        if online.monitors and not self.topics.drift:
            msg = "drift monitors need topics.drift"
            raise ValueError(msg)
        for i, policy in enumerate(online.policies):
            if problem := self._policy_problem(policy):
                msg = f"online.policies[{i}]: {problem}"
                raise ValueError(msg)
        return self

    def _policy_problem(self, policy: PolicySettings) -> str | None:
        """Why this policy could never act, or would send commands every worker rejects."""
        # Imported here: the policy module needs river, which topologies without policies
        # never load.
        from stream_infer.online.policy import Policy

        try:
            Policy(policy.signal, policy.action, policy.model, policy.online_version)
        except ValueError as exc:
            return str(exc).removeprefix("Policy: ")
        if policy.signal not in {m.signal for m in self.online.monitors}:
            return f"no monitor watches signal {policy.signal!r}: the policy would never act"
        if policy.model is not None and self.model(policy.model) is None:
            return f"unknown model {policy.model!r}"
        if policy.online_version is not None:
            models = [policy.model] if policy.model else [m.name for m in self.models]
            for model in models:
                learners = {x.version for x in self.online.learners if x.model == model}
                if policy.online_version not in learners:
                    return (
                        f"{policy.online_version!r} is not an online learner of model "
                        f"{model!r} (online.learners: {sorted(learners) or 'none'})"
                    )
        return None

    def versions_of(self, model: str) -> tuple[str, ...]:
        """Declared versions of a model plus its online learners' versions."""
        settings = self.model(model)
        declared = tuple(v.version for v in settings.versions) if settings else ()
        learners = tuple(x.version for x in self.online.learners if x.model == model)
        return declared + learners

    @property
    def group_id(self) -> str:
        return self.kafka.group_id or f"stream-infer.{self.name}"

    def transactional_id(self, fallback: str) -> str:
        """exactly_once: this worker's ``transactional.id``, ``stream-infer.<name>.<worker
        id>``; ``fallback`` (host name, process id and a random suffix) when ``worker.id`` is
        not set. It must
        be unique among the live workers (a second producer with the same id fences the first);
        a stable one (the pod name) lets a restarted worker abort its predecessor's open
        transaction at once instead of after ``kafka.transaction_timeout_ms``."""
        return f"stream-infer.{self.name}.{self.worker.id or fallback}"

    @property
    def transaction_probe_topic(self) -> str:
        """exactly_once: where the worker checks at start that the cluster's transactions
        work (one partition, records kept an hour)."""
        return f"{self.topics.control}.txn-probe"

    def model(self, name: str) -> ModelSettings | None:
        return next((m for m in self.models if m.name == name), None)

    def prediction_topic(self, model: ModelSettings) -> str:
        return model.prediction_topic or self.topics.predictions

    def all_topics(self) -> list[str]:
        extra = [m.prediction_topic for m in self.models if m.prediction_topic]
        return list(dict.fromkeys(self.topics.all_names() + extra))


def _sections() -> dict[str, type[BaseModel]]:
    """The topology's sections: its fields that are settings objects (kafka, topics, ...)."""
    out: dict[str, type[BaseModel]] = {}
    for name, info in Topology.model_fields.items():
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            out[name] = kind
    return out


def _env_overrides(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """``STREAM_INFER_A__B=v`` becomes ``{"a": {"b": "v"}}``; pydantic coerces the strings.

    Only two shapes are overrides, so that other tools' ``STREAM_INFER_*`` variables (dev.py's
    ``STREAM_INFER_TORCH_SPEC``, ``STREAM_INFER_CACHE_DIR``, the tests' ``STREAM_INFER_TEST_*``)
    never collide with the topology: ``STREAM_INFER_<SECTION>__<FIELD>[__<KEY>...]`` (a
    variable with ``__`` whose first part is not a section is refused, naming it), and
    ``STREAM_INFER_<FIELD>`` for a top-level field that is not a section (``DEVICE``,
    ``NAME``). Returns the tree and, for each path set, the variable it came from.
    """
    sections = _sections()
    top_level = set(Topology.model_fields) - set(sections)
    tree: dict[str, Any] = {}
    sources: dict[tuple[str, ...], str] = {}
    for key in sorted(env):
        if not key.startswith(ENV_PREFIX) or key.startswith(ENV_PREFIX + "TEST_"):
            continue
        path = tuple(key[len(ENV_PREFIX) :].lower().split("__"))
        if len(path) == 1:
            if path[0] not in top_level:
                continue  # another tool's variable, not an override
        elif path[0] not in sections or not all(path):
            msg = (
                f"{path[0]!r} is not a topology section; overrides are "
                f"{ENV_PREFIX}<SECTION>__<FIELD> with SECTION one of "
                f"{', '.join(s.upper() for s in sections)}"
            )
            raise ConfigError(msg, source=f"environment: {key}")
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = env[key]
        sources[path] = key
    return tree, sources


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _format_validation(
    exc: ValidationError, sources: Mapping[tuple[str, ...], str] | None = None
) -> tuple[str, bool]:
    """The errors, one per line, each under the variable it came from when an environment
    override set that field; and whether every error came from the environment."""
    sources = sources or {}
    lines = []
    all_env = True
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        where = ".".join(loc) or "(top level)"
        var = next((v for path, v in sources.items() if loc[: len(path)] == path), None)
        if var is None:
            all_env = False
            lines.append(f"  {where}: {err['msg']}")
        else:
            lines.append(f"  {var} ({where}): {err['msg']}")
    return "\n".join(lines), all_env


def parse_topology(
    data: Mapping[str, Any],
    *,
    base_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    source: str | None = None,
) -> Topology:
    """Validate a topology mapping, with environment overrides applied on top."""
    overrides, sources = _env_overrides(os.environ if env is None else env)
    merged = _merge(dict(data), overrides)
    try:
        topo = Topology.model_validate(merged)
    except ValidationError as exc:
        lines, all_env = _format_validation(exc, sources)
        if all_env and sources:
            raise ConfigError("invalid override:\n" + lines, source="environment") from None
        raise ConfigError("invalid topology:\n" + lines, source=source) from None
    if base_dir is None:
        return topo
    models = tuple(
        m.model_copy(
            update={
                "versions": tuple(
                    v.model_copy(update={"path": (base_dir / v.path).resolve()}) for v in m.versions
                )
            }
        )
        for m in topo.models
    )
    return topo.model_copy(update={"models": models})


def load_topology(path: str | Path, *, env: Mapping[str, str] | None = None) -> Topology:
    """Read, validate and freeze a topology file. Relative model paths are resolved from it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read topology file: {exc.strerror}", source=str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", source=str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError("a topology must be a YAML mapping", source=str(path))
    return parse_topology(data, base_dir=path.parent, env=env, source=str(path))
