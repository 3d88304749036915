"""Integration tier: a real broker, real workers (subprocesses), real topics.

The broker is, in order of preference: an external cluster named by
STREAM_INFER_TEST_BOOTSTRAP_SERVERS; a Kafka testcontainer when STREAM_INFER_TEST_DOCKER=1 and
Docker answers; Apache Kafka (KRaft, one node, stream_infer.local.apache_kafka) started here when
Java 17+ and Maven are present; otherwise the embedded tansu broker, and pytest's header says why in
one line. STREAM_INFER_TEST_BROKER=tansu|kafka forces one. test_tansu_smoke.py runs a subset on
tansu as well, so the demo's broker stays proven. Every test gets its own topics and consumer
group.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from confluent_kafka import Consumer, Producer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from stream_infer.examples import phishing
from stream_infer.io.clients import consume_ready, ensure_topology_topics
from stream_infer.io.watch import assign_all
from stream_infer.local.apache_kafka import KafkaCluster
from stream_infer.local.tansu import EmbeddedBroker, free_port
from stream_infer.settings import (
    ENV_PREFIX,
    Topology,
    load_topology,
)
from tests.brokers import (
    bootstrap_for_tests,
    broker_choice,
    started,
)

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models" / "phishing" / "risk"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


def _docker_kafka(stack: ExitStack) -> str | None:
    try:
        from testcontainers.kafka import KafkaContainer

        container = stack.enter_context(KafkaContainer())
        return str(container.get_bootstrap_server())
    except Exception as exc:  # no Docker engine, no image: fall back to the embedded broker
        log.warning("no Kafka testcontainer (%s); using the embedded broker", exc)
        return None


@pytest.fixture(scope="session")
def bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    choice = broker_choice()
    external = bootstrap_for_tests()
    if external:
        yield external
        return
    with ExitStack() as stack:
        if choice.engine == "docker":
            server = _docker_kafka(stack)
            if server:
                yield server
                return
        if choice.engine == "kafka":
            workdir = tmp_path_factory.mktemp("kafka")
            cluster = stack.enter_context(KafkaCluster(1, workdir=workdir))
            started["kafka"] = cluster.started_in_s or 0.0
            yield cluster.bootstrap_servers
            return
        log_path = tmp_path_factory.mktemp("broker") / "tansu.log"
        broker = stack.enter_context(EmbeddedBroker(log_path=log_path))
        yield broker.bootstrap_servers


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[KafkaCluster | EmbeddedBroker]:
    """A broker of the suite's engine for this test alone (tests that freeze or stop it)."""
    engine = broker_choice().engine
    if engine in {"external", "docker"}:
        pytest.skip("stops or freezes the broker process: only with a broker the tests start")
    if engine == "kafka":
        with KafkaCluster(1, workdir=tmp_path / "kafka") as cluster:
            yield cluster
        return
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as broker:
        yield broker


class Setup:
    """One test's topology (unique topics and group), its files, and helpers around them."""

    def __init__(
        self,
        bootstrap: str,
        tmp: Path,
        *,
        client_conf: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> None:
        self.bootstrap = bootstrap
        self.tmp = tmp
        # Merged into every client these helpers create: security settings for a secured broker.
        self.client_conf: dict[str, Any] = dict(client_conf or {})
        suffix = uuid.uuid4().hex[:8]
        self.doc: dict[str, Any] = {
            "name": f"it-{suffix}",
            "kafka": {
                "bootstrap_servers": bootstrap,
                "session_timeout_ms": 6000,
                "group_id": f"it-{suffix}",
            },
            "topics": {
                name: f"it-{suffix}.{name}"
                for name in (
                    "input",
                    "predictions",
                    "dead_letter",
                    "control",
                    "acks",
                    "shadow",
                    "labels",
                    "drift",
                )
            }
            | {"partitions": 4},
            "features": list(phishing.FEATURES),
            "models": [
                {
                    "name": "risk",
                    "serving": "v1",
                    "versions": [
                        {"version": "v1", "path": str(MODELS / "v1")},
                        {"version": "v2", "path": str(MODELS / "v2")},
                    ],
                }
            ],
            "batching": {"max_batch_size": 256, "max_wait_ms": 10},
            "worker": {"web_port": free_port()},
            "device": "cpu",
        }
        for key, value in overrides.items():
            if isinstance(value, dict):
                # None removes a default (kafka.session_timeout_ms under the consumer protocol).
                merged = self.doc.get(key, {}) | value
                self.doc[key] = {k: v for k, v in merged.items() if v is not None}
            else:
                self.doc[key] = value
        self.path = tmp / f"{self.doc['name']}.yaml"
        self.path.write_text(yaml.safe_dump(self.doc))
        self.topology: Topology = load_topology(self.path, env={})
        ensure_topology_topics(self.topology)
        self.workers: list[subprocess.Popen[bytes]] = []

    @property
    def topics(self) -> Any:
        return self.topology.topics

    def start_worker(
        self,
        web_port: int | None = None,
        log_level: str = "info",
        module: tuple[str, ...] = ("stream_infer",),
    ) -> subprocess.Popen[bytes]:
        """A worker process; ``module``: what ``python -m`` runs, and its own arguments before
        the CLI's (a test wrapper such as tests.integration.faulty_worker)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        env[ENV_PREFIX + "WORKER__WEB_PORT"] = str(web_port or free_port())
        log_file = (self.tmp / f"worker-{len(self.workers)}.log").open("wb")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                *module,
                "--log-level",
                log_level,
                "worker",
                str(self.path),
            ],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        log_file.close()
        self.workers.append(proc)
        return proc

    def worker_logs(self) -> str:
        return "\n".join(
            p.read_text(errors="replace")[-4000:] for p in sorted(self.tmp.glob("worker-*.log"))
        )

    def produce(self, items: list[tuple[bytes | None, bytes]], topic: str | None = None) -> None:
        producer = Producer(
            {"bootstrap.servers": self.bootstrap, "linger.ms": 5} | self.client_conf
        )
        for key, value in items:
            producer.produce(topic or self.topics.input, value, key)
            producer.poll(0)
        assert producer.flush(30) == 0

    def consumer(self, *topics: str) -> Consumer:
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": "it-reader",
                "enable.auto.commit": False,
            }
            | self.client_conf
        )
        assign_all(consumer, list(topics), from_beginning=True)
        return consumer

    def collect(
        self, topic: str, until: int, timeout_s: float = 60.0, consumer: Consumer | None = None
    ) -> list[dict[str, Any]]:
        """Read records of a topic until `until` have arrived or the timeout passes."""
        own = consumer is None
        consumer = consumer or self.consumer(topic)
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        try:
            while len(out) < until and time.monotonic() < deadline:
                for msg in consume_ready(consumer, 1000, 0.2):
                    if msg.error() is None:
                        out.append(orjson.loads(msg.value()))
                if any(p.poll() is not None and p.returncode not in (0, -9) for p in self.workers):
                    raise AssertionError("a worker died:\n" + self.worker_logs())
        finally:
            if own:
                consumer.close()
        return out

    def collect_until_ids(
        self, topic: str, ids: set[str], timeout_s: float = 120.0, consumer: Consumer | None = None
    ) -> list[dict[str, Any]]:
        """Read records until every id in `ids` has been seen (or the timeout passes)."""
        reader = consumer or self.consumer(topic)
        out: list[dict[str, Any]] = []
        waiting = set(ids)
        deadline = time.monotonic() + timeout_s
        try:
            while waiting and time.monotonic() < deadline:
                batch = self.collect(topic, until=1, timeout_s=1.0, consumer=reader)
                out.extend(batch)
                waiting.difference_update(r.get("id") for r in batch)
            # Whatever else is already there (duplicates) is part of the answer too.
            out.extend(self.collect(topic, until=10**9, timeout_s=1.0, consumer=reader))
        finally:
            if consumer is None:
                reader.close()
        return out

    def committed(self, topic: str) -> int:
        """The sum over a topic's partitions of the workers' group's committed offsets."""
        group = Consumer(
            {"bootstrap.servers": self.bootstrap, "group.id": self.topology.group_id}
            | self.client_conf
        )
        try:
            meta = group.list_topics(topic, timeout=10).topics[topic]
            parts = [TopicPartition(topic, p) for p in meta.partitions]
            return sum(max(tp.offset, 0) for tp in group.committed(parts, timeout=10))
        finally:
            group.close()

    def kill(self) -> None:
        """SIGKILL whatever still runs: a finished test's workers (what a graceful stop does is
        tested where it matters; waiting ~2.5 s for each one's drain cost the suite minutes)."""
        for proc in self.workers:
            if proc.poll() is None:
                proc.kill()
        for proc in self.workers:
            proc.wait(30)

    def stop(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.workers:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def make_setup(bootstrap: str, tmp_path: Path) -> Iterator[Any]:
    made: list[Setup] = []

    def make(**overrides: Any) -> Setup:
        setup = Setup(bootstrap, tmp_path, **overrides)
        made.append(setup)
        return setup

    yield make
    for setup in made:
        setup.kill()


def metrics_text(port: int, timeout_s: float = 5.0) -> str:
    """A worker's /metrics page. Raises OSError while its web server does not answer."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as r:
        return str(r.read().decode())


def metric(port: int, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels`` (0.0 when none).

    Raises OSError while the worker's web server does not answer."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics_text(port))
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def scrape(port: int, name: str, **labels: str) -> float:
    """:func:`metric`, or 0.0 while the worker's web server does not answer (yet)."""
    try:
        return metric(port, name, **labels)
    except OSError:
        return 0.0


def probe(port: int, path: str) -> tuple[int, dict[str, Any]]:
    """A worker's JSON page (``/healthz``, ``/readyz``): its status and body."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, orjson.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


def health(port: int) -> tuple[int, dict[str, Any]]:
    """/healthz: its status and body."""
    return probe(port, "/healthz")


def readiness(port: int) -> tuple[int, dict[str, Any]]:
    """/readyz: its status and body."""
    return probe(port, "/readyz")


def assert_healthy(port: int) -> None:
    """200, no problem, no warning (``oldest_unacked_s`` is whatever it is)."""
    status, body = health(port)
    assert (status, body["ok"], body["problems"], body.get("warnings")) == (200, True, [], None), (
        status,
        body,
    )


def wait_ready(port: int, timeout_s: float = 60.0) -> None:
    """Wait until the worker on ``port`` answers /readyz with 200."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"worker on port {port} not ready after {timeout_s}s")


def good_events(n: int, prefix: str = "e") -> list[tuple[bytes | None, bytes]]:
    rows = phishing.events(seed=7)
    out: list[tuple[bytes | None, bytes]] = []
    for i in range(n):
        _, feats, _ = next(rows)
        event_id = f"{prefix}-{i}"
        out.append((f"k-{i % 997}".encode(), orjson.dumps({"id": event_id, "features": feats})))
    return out
