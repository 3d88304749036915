"""A local Apache Kafka in KRaft mode: one node or several, each a combined controller and
broker, started with plain ``java`` on loopback.

Each node gets free ports, a data directory under the cluster's work directory (a temporary
folder unless one is given) and a small heap. Nodes die with the process that started them
(Linux's parent-death signal, SIGKILL), so a killed test run leaves no broker behind; a clean
stop is SIGTERM (Kafka's controlled shutdown), then SIGKILL after a timeout.

    with KafkaCluster(nodes=3) as cluster:
        cluster.bootstrap_servers          # "127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3"
        cluster.kill(cluster.partition_leader("t", 0))
        cluster.start_node(...)

Fault tests use :meth:`KafkaCluster.kill`, :meth:`terminate`, :meth:`start_node`,
:meth:`partition_leader` and :meth:`quorum_leader`.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import logging
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from stream_infer.errors import BrokerError
from stream_infer.local.apache_kafka.distribution import (
    LOG4J_CONFIG,
    kafka_classpath,
    kafka_version,
)

log = logging.getLogger(__name__)

CLIENT = "PLAINTEXT"
CONTROLLER = "CONTROLLER"
_LEADER_RE = re.compile(r"\[RaftManager id=(\d+)\] Completed transition to Leader\(.*?epoch=(\d+)")


@dataclass(frozen=True)
class Listener:
    """An extra client listener: its name in Kafka's config and its security protocol."""

    name: str
    protocol: str  # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL


def _free_ports(n: int, host: str) -> list[int]:
    """n distinct free ports (held open together so none is handed out twice)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]


def new_cluster_id() -> str:
    """A random KRaft cluster id: a UUID in URL-safe base64, as Kafka's ``Uuid.randomUuid()``
    makes them, never starting with "-" (the storage tool would read ``-t -x...`` as an option
    and refuse to format: 1 start in 64)."""
    while True:
        found = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not found.startswith("-"):
            return found


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """SIGKILL the broker if the thread that started it dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


class KafkaNode:
    """One combined controller + broker process."""

    def __init__(
        self,
        node_id: int,
        *,
        host: str,
        workdir: Path,
        ports: Mapping[str, int],
        protocols: Mapping[str, str],
        heap_mb: int,
    ) -> None:
        self.node_id = node_id
        self.host = host
        self.workdir = workdir
        self.ports = dict(ports)  # listener name -> port, CONTROLLER included
        self.protocols = dict(protocols)  # listener name -> security protocol
        self.heap_mb = heap_mb
        self.data_dir = workdir / "data"
        self.config_path = workdir / "server.properties"
        self.log_path = workdir / "server.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def address(self, listener: str = CLIENT) -> str:
        return f"{self.host}:{self.ports[listener]}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def java(self, main: str, *args: str) -> list[str]:
        return [
            "java",
            f"-Xms{self.heap_mb}m",
            f"-Xmx{self.heap_mb}m",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
            "-cp",
            kafka_classpath(),
            main,
            *args,
        ]

    def write_config(self, properties: Mapping[str, str]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        lines = [f"{k}={v}" for k, v in properties.items()]
        self.config_path.write_text("\n".join(lines) + "\n")

    def format(self, cluster_id: str) -> None:
        """Format the data directory (once; a restart keeps it)."""
        cmd = self.java("kafka.tools.StorageTool", "format", "-t", cluster_id)
        cmd += ["-c", str(self.config_path)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr)[-2000:]
            raise BrokerError(f"formatting Kafka node {self.node_id} failed:\n{tail}")

    def start(self) -> None:
        if self.alive:
            return
        with self.log_path.open("ab") as out:
            self._proc = subprocess.Popen(
                self.java("kafka.Kafka", str(self.config_path)),
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 (prctl only)
            )

    def signal(self, sig: signal.Signals) -> None:
        if self.alive and self._proc is not None:
            self._proc.send_signal(sig)

    def stop(self, timeout_s: float = 20.0) -> float:
        """SIGTERM (controlled shutdown), then SIGKILL after ``timeout_s``. Seconds it took."""
        started = time.monotonic()
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return 0.0
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning(
                "Kafka node %d ignored SIGTERM for %.0f s; killing it", self.node_id, timeout_s
            )
            proc.kill()
            proc.wait()
        return time.monotonic() - started

    def kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def log_tail(self, n_bytes: int = 3000) -> str:
        try:
            return self.log_path.read_bytes()[-n_bytes:].decode(errors="replace")
        except OSError:
            return ""


class KafkaCluster:
    """``nodes`` combined KRaft nodes on ``host``.

    ``listeners`` adds client listeners beside the plaintext one every node has (TLS, SASL);
    ``config`` adds or overrides broker properties, ``{node_id}`` and ``{workdir}`` expanded.
    ``workdir`` keeps the data directories where the caller wants them (for restarts across
    processes); by default a temporary folder removed by :meth:`stop`.
    """

    def __init__(
        self,
        nodes: int = 1,
        *,
        host: str = "127.0.0.1",
        listeners: Sequence[Listener] = (),
        config: Mapping[str, str] | None = None,
        workdir: Path | None = None,
        heap_mb: int = 512,
        start_timeout_s: float = 120.0,
        client_port: int = 0,
    ) -> None:
        if nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {nodes}")
        self.n_nodes = nodes
        self.host = host
        self.listeners = tuple(listeners)
        self.config = dict(config or {})
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="stream-infer-kafka-"))
        self.heap_mb = heap_mb
        self.client_port = client_port  # the first node's plaintext port; 0 picks a free one
        self.start_timeout_s = start_timeout_s
        self.cluster_id = new_cluster_id()
        self.nodes: dict[int, KafkaNode] = {}
        self.started_in_s: float | None = None

    # -- addresses ---------------------------------------------------------------------------

    @property
    def version(self) -> str:
        return kafka_version()

    @property
    def bootstrap_servers(self) -> str:
        return self.address(CLIENT)

    def address(self, listener: str) -> str:
        """Every node's address on one listener, as a bootstrap list."""
        return ",".join(node.address(listener) for node in self.nodes.values())

    # -- lifecycle ---------------------------------------------------------------------------

    def _properties(self, node: KafkaNode, voters: str) -> dict[str, str]:
        names = [CLIENT, CONTROLLER, *(lst.name for lst in self.listeners)]
        client_names = [n for n in names if n != CONTROLLER]
        replication = min(3, self.n_nodes)
        props = {
            "process.roles": "broker,controller",
            "node.id": str(node.node_id),
            "controller.quorum.voters": voters,
            "listeners": ",".join(f"{n}://{node.address(n)}" for n in names),
            "advertised.listeners": ",".join(f"{n}://{node.address(n)}" for n in client_names),
            "listener.security.protocol.map": ",".join(f"{n}:{node.protocols[n]}" for n in names),
            "controller.listener.names": CONTROLLER,
            "inter.broker.listener.name": CLIENT,
            "log.dirs": str(node.data_dir),
            "num.partitions": "1",
            "offsets.topic.replication.factor": str(replication),
            # 10 partitions, not 50: the internal topics are created in a second, not five.
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": str(replication),
            "transaction.state.log.min.isr": str(min(2, replication)),
            "transaction.state.log.num.partitions": "10",
            # A test's consumer group should not wait 3 s for members that will never come.
            "group.initial.rebalance.delay.ms": "0",
        }
        for key, value in self.config.items():
            props[key] = value.format(node_id=node.node_id, workdir=node.workdir)
        return props

    def start(self) -> KafkaCluster:
        started = time.monotonic()
        protocols = {CLIENT: "PLAINTEXT", CONTROLLER: "PLAINTEXT"}
        protocols |= {lst.name: lst.protocol for lst in self.listeners}
        names = list(protocols)
        ports = iter(_free_ports(len(names) * self.n_nodes, self.host))
        for node_id in range(1, self.n_nodes + 1):
            node_ports = {name: next(ports) for name in names}
            if node_id == 1 and self.client_port:
                node_ports[CLIENT] = self.client_port
            self.nodes[node_id] = KafkaNode(
                node_id,
                host=self.host,
                workdir=self.workdir / f"node-{node_id}",
                ports=node_ports,
                protocols=protocols,
                heap_mb=self.heap_mb,
            )
        voters = ",".join(f"{n.node_id}@{n.address(CONTROLLER)}" for n in self.nodes.values())
        for node in self.nodes.values():
            node.write_config(self._properties(node, voters))
        try:
            with ThreadPoolExecutor(self.n_nodes) as pool:
                list(pool.map(lambda n: n.format(self.cluster_id), self.nodes.values()))
            for node in self.nodes.values():
                node.start()
            self.wait_ready(self.n_nodes, self.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.started_in_s = time.monotonic() - started
        log.info(
            "Apache Kafka %s: %d node(s) on %s, started in %.1f s",
            self.version,
            self.n_nodes,
            self.bootstrap_servers,
            self.started_in_s,
        )
        return self

    def wait_ready(self, brokers: int, timeout_s: float = 60.0) -> None:
        """Wait until ``brokers`` brokers are registered and serving metadata."""
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + timeout_s
        live = [n for n in self.nodes.values() if n.alive]
        admin: AdminClient | None = None
        seen = 0
        while time.monotonic() < deadline:
            for node in self.nodes.values():
                if node.pid is not None and not node.alive:
                    msg = f"Kafka node {node.node_id} exited at start:\n{node.log_tail()}"
                    raise BrokerError(msg, bootstrap_servers=self.bootstrap_servers)
            if admin is None and all(_listening(n.host, n.ports[CLIENT]) for n in live):
                # Only once every listener accepts, so the client logs no refused connects.
                admin = AdminClient({"bootstrap.servers": ",".join(n.address() for n in live)})
            if admin is not None:
                with contextlib.suppress(Exception):
                    seen = len(admin.list_topics(timeout=1).brokers)
                    if seen >= brokers:
                        return
            time.sleep(0.1)
        tails = "\n".join(n.log_tail(1500) for n in self.nodes.values())
        msg = f"Kafka: {seen} of {brokers} brokers up after {timeout_s:.0f} s\n{tails}"
        raise BrokerError(msg, bootstrap_servers=self.bootstrap_servers)

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop every node (SIGTERM, then SIGKILL) and remove a temporary work directory."""
        live = [n for n in self.nodes.values() if n.alive]
        for node in live:
            node.signal(signal.SIGTERM)
        with ThreadPoolExecutor(max(1, len(live))) as pool:
            list(pool.map(lambda n: n.stop(timeout_s), live))
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> KafkaCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- faults ------------------------------------------------------------------------------

    def pause(self) -> None:
        """Freeze every node (SIGSTOP), for fault tests."""
        for node in self.nodes.values():
            node.signal(signal.SIGSTOP)

    def resume(self) -> None:
        for node in self.nodes.values():
            node.signal(signal.SIGCONT)

    def kill(self, node_id: int) -> None:
        """SIGKILL one node."""
        self.nodes[node_id].kill()

    def terminate(self, node_id: int, timeout_s: float = 20.0) -> float:
        """SIGTERM one node, SIGKILL after ``timeout_s``; the seconds it took."""
        return self.nodes[node_id].stop(timeout_s)

    def start_node(self, node_id: int, timeout_s: float = 60.0) -> None:
        """Start a stopped node on its old ports and data, and wait until it is back."""
        self.nodes[node_id].start()
        self.wait_ready(sum(n.alive for n in self.nodes.values()), timeout_s)

    def partition_leader(self, topic: str, partition: int, timeout_s: float = 10.0) -> int:
        """The node id leading one partition, from the cluster's metadata."""
        from confluent_kafka.admin import AdminClient

        live = [n.address() for n in self.nodes.values() if n.alive]
        admin = AdminClient({"bootstrap.servers": ",".join(live)})
        meta = admin.list_topics(topic, timeout=timeout_s).topics[topic]
        if meta.error is not None:
            raise BrokerError(f"no metadata for {topic}: {meta.error}")
        return int(meta.partitions[partition].leader)

    def quorum_leader(self) -> int:
        """The active controller: the live node whose log shows the newest leader epoch."""
        best: tuple[int, int] | None = None
        for node in self.nodes.values():
            if not node.alive:
                continue
            for found in _LEADER_RE.finditer(node.log_tail(10**7)):
                node_id, epoch = int(found.group(1)), int(found.group(2))
                if best is None or epoch > best[1]:
                    best = (node_id, epoch)
        if best is None:
            raise BrokerError("no live node's log names a quorum leader yet")
        return best[0]
