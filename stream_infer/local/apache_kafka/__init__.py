"""Apache Kafka, run locally from Maven Central's jars: the broker of the integration tests,
the fault tests and the benchmark (the demo's default stays the embedded tansu broker).

``distribution`` resolves the pinned version (``pom.xml``) into a cache; ``cluster`` starts one
KRaft node or several on loopback and injects faults.
"""

from stream_infer.local.apache_kafka.cluster import KafkaCluster, KafkaNode, Listener
from stream_infer.local.apache_kafka.distribution import (
    kafka_classpath,
    kafka_version,
    missing_tools,
)

__all__ = [
    "KafkaCluster",
    "KafkaNode",
    "Listener",
    "kafka_classpath",
    "kafka_version",
    "missing_tools",
]
