"""Access at the broker itself: the whole worker against Apache Kafka's own TLS and SASL/SCRAM
listeners, its principal holding only the ACLs docs/production.md lists, and no secret in what
it writes.

One Apache Kafka node (KRaft) per module, started here, with four listeners:

    PLAINTEXT  ANONYMOUS, a super user: inter-broker, and the tests' admin and operator side
               (topics, SCRAM users, ACLs, producing events, reading predictions, commands)
    MTLS       SSL with ssl.client.auth=required
    SCRAM512   SASL_SSL, SCRAM-SHA-512
    SCRAM256   SASL_PLAINTEXT, SCRAM-SHA-256

and KRaft's StandardAuthorizer, which denies what no ACL allows. The worker reaches the broker
only through one secured listener, with its own credentials and exactly the documented ACLs
(:func:`worker_acls`). The security settings must reach every client it creates: the admin
client (topic check at start), the control-log consumer (replayed before serving), the input
consumer and the producer (predictions, dead letters, acks). A worker that serves N events end
to end and answers a control command has used all of them; clients without the right
credentials are refused at the same listener, so these tests fail if security were not
enforced. Without a permission it needs, the worker says which, once, and /healthz names it
among its warnings (status 200: a restart would not grant it).

Needs Java 17+ and Maven (the cluster is started by the tests); skipped, saying why, otherwise.
"""

from __future__ import annotations

import datetime
import ipaddress
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AclBinding,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from stream_infer.io.controller import Controller, new_command
from stream_infer.local.apache_kafka import KafkaCluster
from stream_infer.local.apache_kafka.cluster import Listener
from stream_infer.local.tansu import free_port
from tests.brokers import require_local_kafka
from tests.integration.conftest import Setup, good_events, health, metric, wait_ready

N = 300
JAAS = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
# The client certificate's subject: Kafka's default principal for a TLS client is its DN.
MTLS_PRINCIPAL = "User:CN=stream-infer"


# -- certificates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_keystore: Path  # the server's PKCS#8 key (unencrypted), its certificate, the CA
    client_cert: Path
    client_key: Path


def make_certs(folder: Path) -> Certs:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate
    (subject CN=stream-infer)."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stream-infer test CA")])
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    ca = (
        _builder(ca_name, ca_name, ca_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(name: str, eku: x509.ObjectIdentifier, san: list[x509.GeneralName]) -> Any:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            _builder(subject, ca_name, key.public_key(), now)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    server, server_key = leaf(
        "localhost",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client, client_key = leaf("stream-infer", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    certs = Certs(
        ca=folder / "ca.pem",
        server_keystore=folder / "server-keystore.pem",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
    )
    certs.ca.write_bytes(ca.public_bytes(pem))
    certs.server_keystore.write_bytes(
        server_key.private_bytes(pem, pkcs8, serialization.NoEncryption())
        + server.public_bytes(pem)
        + ca.public_bytes(pem)
    )
    certs.client_cert.write_bytes(client.public_bytes(pem))
    certs.client_key.write_bytes(client_key.private_bytes(pem, pkcs8, serialization.NoEncryption()))
    for path in (certs.server_keystore, certs.client_key):
        path.chmod(0o600)
    return certs


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: Any, now: datetime.datetime
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


# -- the cluster ----------------------------------------------------------------------------


def secure_broker_config(certs: Certs) -> dict[str, str]:
    """Broker properties (Kafka 4.1) for the MTLS, SCRAM512 and SCRAM256 listeners."""
    return {
        # PEM key store and trust store (no JKS, no store password): one file holds the
        # unencrypted PKCS#8 key and the certificate chain.
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(certs.server_keystore),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(certs.ca),
        "listener.name.mtls.ssl.client.auth": "required",
        "listener.name.scram512.sasl.enabled.mechanisms": "SCRAM-SHA-512",
        "listener.name.scram512.scram-sha-512.sasl.jaas.config": JAAS,
        "listener.name.scram256.sasl.enabled.mechanisms": "SCRAM-SHA-256",
        "listener.name.scram256.scram-sha-256.sasl.jaas.config": JAAS,
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        # The PLAINTEXT listener (inter-broker, controller, the tests' admin) is ANONYMOUS.
        "super.users": "User:ANONYMOUS",
    }


@dataclass
class SecureKafka:
    cluster: KafkaCluster
    certs: Certs

    @property
    def plain(self) -> str:
        return self.cluster.bootstrap_servers

    def admin(self) -> AdminClient:
        """An admin client over PLAINTEXT: a super user (one per call: none outlives the
        cluster to log refused connections after it stopped)."""
        return AdminClient({"bootstrap.servers": self.plain})

    def address(self, listener: str) -> str:
        return self.cluster.address(listener)

    def add_user(self, user: str, password: str, mechanism: str) -> None:
        kind = {"SCRAM-SHA-256": ScramMechanism.SCRAM_SHA_256}.get(
            mechanism, ScramMechanism.SCRAM_SHA_512
        )
        upsert = UserScramCredentialUpsertion(
            user, ScramCredentialInfo(kind, 4096), password.encode()
        )
        admin = self.admin()  # held until the futures are done
        for future in admin.alter_user_scram_credentials([upsert]).values():
            future.result(timeout=30)

    def grant(self, acls: list[AclBinding]) -> None:
        admin = self.admin()
        for future in admin.create_acls(acls, request_timeout=30).values():
            future.result(timeout=30)


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureKafka]:
    require_local_kafka()
    folder = tmp_path_factory.mktemp("secure-kafka")
    certs = make_certs(folder / "tls")
    listeners = [
        Listener("MTLS", "SSL"),
        Listener("SCRAM512", "SASL_SSL"),
        Listener("SCRAM256", "SASL_PLAINTEXT"),
    ]
    with KafkaCluster(
        1, listeners=listeners, config=secure_broker_config(certs), workdir=folder / "kafka"
    ) as cluster:
        yield SecureKafka(cluster, certs)


# -- ACLs -----------------------------------------------------------------------------------


def worker_acls(principal: str, setup: Setup) -> list[AclBinding]:
    """Exactly what docs/production.md ("Kafka ACLs for the workers' principal") lists, for
    this topology: topics created beforehand, so no Create."""
    topics = setup.topics
    topology = setup.topology

    def allow(kind: ResourceType, name: str, operation: AclOperation) -> AclBinding:
        return AclBinding(
            kind,
            name,
            ResourcePatternType.LITERAL,
            principal,
            "*",
            operation,
            AclPermissionType.ALLOW,
        )

    read, write, describe = AclOperation.READ, AclOperation.WRITE, AclOperation.DESCRIBE
    acls = [
        allow(ResourceType.TOPIC, topics.input, read),
        allow(ResourceType.GROUP, topology.group_id, read),
        allow(ResourceType.TOPIC, topics.control, read),
        allow(ResourceType.TOPIC, topics.control, AclOperation.DESCRIBE_CONFIGS),
    ]
    outputs = [topology.prediction_topic(m) for m in topology.models]
    outputs += [topics.dead_letter, topics.shadow, topics.acks]
    acls += [allow(ResourceType.TOPIC, t, write) for t in dict.fromkeys(outputs) if t]
    # Their max.message.bytes, read at start (batch.size under it; dead letters that fit).
    describe_configs = AclOperation.DESCRIBE_CONFIGS
    acls += [allow(ResourceType.TOPIC, t, describe_configs) for t in dict.fromkeys(outputs) if t]
    # Declared but not used without online learning: the worker checks that they exist.
    acls += [allow(ResourceType.TOPIC, t, describe) for t in (topics.labels, topics.drift) if t]
    # Describe on every topic: Read and Write include it, granted explicitly all the same.
    acls += [allow(ResourceType.TOPIC, t, describe) for t in (topics.input, *outputs) if t]
    acls += [allow(ResourceType.TOPIC, topics.control, describe)]
    return acls


def without(acls: list[AclBinding], topic: str, operation: AclOperation) -> list[AclBinding]:
    left = [a for a in acls if not (a.name == topic and a.operation == operation)]
    assert len(left) == len(acls) - 1
    return left


def secured_setup(
    kafka: SecureKafka, tmp: Path, worker_kafka: dict[str, Any], **overrides: Any
) -> Setup:
    """A test's topics, made by the super user; the worker's topology file reaches the broker
    only through ``worker_kafka`` (a secured listener and its credentials). The Setup's own
    helpers (produce, collect, Controller on ``setup.topology``) stay on PLAINTEXT."""
    setup = Setup(kafka.plain, tmp, **overrides)
    doc = setup.doc | {"kafka": setup.doc["kafka"] | worker_kafka}
    setup.path = tmp / f"{doc['name']}.worker.yaml"
    setup.path.write_text(yaml.safe_dump(doc))
    return setup


@pytest.fixture
def setups() -> Iterator[list[Setup]]:
    made: list[Setup] = []
    yield made
    for setup in made:
        setup.stop()


# -- checks ---------------------------------------------------------------------------------


def refusal(bootstrap: str, conf: dict[str, Any], expect: int | None = None) -> list[KafkaError]:
    """The errors a client with ``conf`` meets (waiting a little for an ``expect`` one); fails
    the test if the client is let in."""
    errors: list[KafkaError] = []
    quiet: dict[str, Any] = {"log_level": 0, "error_cb": errors.append}
    admin = AdminClient({"bootstrap.servers": bootstrap} | quiet | conf)
    with pytest.raises(KafkaException):
        admin.list_topics(timeout=1.0)
    deadline = time.monotonic() + 5.0
    while expect is not None and time.monotonic() < deadline:
        if any(e.code() == expect for e in errors):
            break
        admin.poll(0.1)
    return errors


def command(setup: Setup, name: str, wait_s: float = 20.0) -> list[dict[str, Any]]:
    """Send a command as the operator (PLAINTEXT, signed when the topology has a key); the
    workers' acks."""
    ctl = Controller(setup.topology)
    try:
        return ctl.acks(ctl.send(new_command(name))["id"], wait_s=wait_s, workers=1)
    finally:
        ctl.close()


def serves_end_to_end(setup: Setup) -> None:
    """N events in, N predictions out, and a control command answered: every client works."""
    setup.produce(good_events(N))
    ids = {f"e-{i}" for i in range(N)}
    preds = setup.collect_until_ids(setup.topics.predictions, ids, timeout_s=40)
    assert sorted(p["id"] for p in preds) == sorted(ids), setup.worker_logs()  # no duplicate
    acks = command(setup, "status")
    assert [a["status"] for a in acks] == ["applied"], setup.worker_logs()
    assert setup.workers[0].poll() is None


def healthy(port: int) -> bool:
    status, body = health(port)
    return status == 200 and body["ok"] is True and body["problems"] == []


def wait_warned(port: int, timeout_s: float = 30.0) -> list[str]:
    """The /healthz warnings once there are some. A refused permission is no reason to restart
    (a restart never grants it): the status must stay 200, or the liveness probe would restart
    the pod in a loop."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            status, body = health(port)
        except OSError:  # its web server is not up yet
            status, body = 200, {"problems": []}
        assert status == 200 and body["problems"] == [], body
        if body.get("warnings"):
            return list(body["warnings"])
        time.sleep(0.2)
    raise AssertionError(f"/healthz had no warning for {timeout_s:.0f} s")


def logged(setup: Setup, level: str) -> list[str]:
    lines = "\n".join(p.read_text(errors="replace") for p in sorted(setup.tmp.glob("worker-*")))
    return [line for line in lines.splitlines() if f"[{level}]" in line]


# -- the worker over each listener, with the documented ACLs ------------------------------


def test_worker_serves_through_mutual_tls_with_the_documented_acls(
    kafka: SecureKafka, tmp_path: Path, setups: list[Setup]
) -> None:
    certs = kafka.certs
    files = {
        "ssl_ca_location": str(certs.ca),
        "ssl_certificate_location": str(certs.client_cert),
        "ssl_key_location": str(certs.client_key),
    }
    bootstrap = kafka.address("MTLS")
    setup = secured_setup(
        kafka, tmp_path, {"bootstrap_servers": bootstrap, "security_protocol": "SSL"} | files
    )
    setups.append(setup)
    kafka.grant(worker_acls(MTLS_PRINCIPAL, setup))
    setup.start_worker()  # it boots while the refusals are checked
    refusal(bootstrap, {})  # plaintext
    refusal(bootstrap, {"security.protocol": "SSL", "ssl.ca.location": str(certs.ca)})  # no cert
    serves_end_to_end(setup)
    assert logged(setup, "ERROR") == []
    # The documented ACLs include what the start-up checks read (the control topic's config).
    assert not [w for w in logged(setup, "WARNING") if "control topic" in w], setup.worker_logs()


def test_worker_serves_through_sasl_ssl_with_scram_sha_512(
    kafka: SecureKafka, tmp_path: Path, setups: list[Setup]
) -> None:
    user, password = f"worker-{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    kafka.add_user(user, password, "SCRAM-SHA-512")
    bootstrap = kafka.address("SCRAM512")
    ca = str(kafka.certs.ca)
    setup = secured_setup(
        kafka,
        tmp_path,
        {
            "bootstrap_servers": bootstrap,
            "security_protocol": "SASL_SSL",
            "ssl_ca_location": ca,
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": user,
            "sasl_password": password,
        },
    )
    setups.append(setup)
    kafka.grant(worker_acls(f"User:{user}", setup))
    setup.start_worker()
    tls_only = {"security.protocol": "SSL", "ssl.ca.location": ca}
    refusal(bootstrap, tls_only)  # TLS but no login
    sasl = {"sasl.mechanism": "SCRAM-SHA-512", "sasl.username": user}
    client = tls_only | sasl | {"security.protocol": "SASL_SSL"}
    wrong = refusal(bootstrap, client | {"sasl.password": "not-it"}, KafkaError._AUTHENTICATION)
    assert any(e.code() == KafkaError._AUTHENTICATION for e in wrong), wrong
    serves_end_to_end(setup)
    assert logged(setup, "ERROR") == []


def send_unsigned(setup: Setup, doc: dict[str, Any]) -> list[str]:
    """Produce a command without a signature (as the operator); the reasons in the acks."""
    ctl = Controller(setup.topology)  # reads acks from the end: before the command goes out
    producer = Producer({"bootstrap.servers": setup.bootstrap})
    producer.produce(setup.topics.control, orjson.dumps(doc))
    assert producer.flush(10) == 0
    try:
        return [a["reason"] for a in ctl.acks(doc["id"], wait_s=20, workers=1)]
    finally:
        ctl.close()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


def _raw_records(setup: Setup, topic: str, until: int, timeout_s: float = 30.0) -> list[bytes]:
    """The records of a topic, raw: key, value and headers of each in one byte string. Reads
    until ``until`` have come, then one more second for any others."""
    consumer = setup.consumer(topic)
    out: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    settle: float | None = None
    try:
        while time.monotonic() < (settle or deadline):
            for msg in consumer.consume(500, 0.2):
                if msg.error() is None:
                    headers = repr(msg.headers() or []).encode()
                    out.append((msg.key() or b"") + (msg.value() or b"") + headers)
            if settle is None and len(out) >= until:
                settle = time.monotonic() + 1.0
    finally:
        consumer.close()
    return out


def test_no_secret_in_logs_metrics_or_dead_letters(
    kafka: SecureKafka, tmp_path: Path, setups: list[Setup]
) -> None:
    """SASL_PLAINTEXT with SCRAM-SHA-256, a control HMAC key, a worker logging at debug: bad
    events and an unsigned command make it write dead letters, acks and warnings; neither the
    password nor the key may appear in any of them, nor in /metrics, /healthz, /readyz."""
    user, password = f"worker-{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    hmac_key = f"hk-{uuid.uuid4().hex}"
    kafka.add_user(user, password, "SCRAM-SHA-256")
    bootstrap = kafka.address("SCRAM256")
    sasl = {"sasl.mechanism": "SCRAM-SHA-256", "sasl.username": user, "sasl.password": password}
    client = {"security.protocol": "SASL_PLAINTEXT"} | sasl
    setup = secured_setup(
        kafka,
        tmp_path,
        {
            "bootstrap_servers": bootstrap,
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "SCRAM-SHA-256",
            "sasl_username": user,
            "sasl_password": password,
        },
        control={"hmac_key": hmac_key},
    )
    setups.append(setup)
    kafka.grant(worker_acls(f"User:{user}", setup))
    bad: list[tuple[bytes | None, bytes]] = [
        (b"b1", b"not json"),
        (b"b2", b'{"id": "x-2"}'),
        (None, b"\xff\xfe binary"),
    ]
    web_port = free_port()
    setup.start_worker(web_port=web_port, log_level="debug")
    refusal(bootstrap, {})  # no login
    wrong = refusal(bootstrap, client | {"sasl.username": "other"}, KafkaError._AUTHENTICATION)
    assert any(e.code() == KafkaError._AUTHENTICATION for e in wrong), wrong
    setup.produce(bad)
    serves_end_to_end(setup)  # its status command is signed: the topology has the key
    unsigned = new_command("swap", model="risk", version="v2")
    assert send_unsigned(setup, unsigned) == ["unsigned"]
    dead = _raw_records(setup, setup.topics.dead_letter, until=len(bad))
    acks = _raw_records(setup, setup.topics.acks or "", until=2)
    scraped = {
        path: _get(f"http://127.0.0.1:{web_port}{path}")
        for path in ("/metrics", "/healthz", "/readyz")
    }
    setup.stop()
    logs = "\n".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("worker-*.log")))

    # What was scraped is real, so that the absence below means something.
    assert len(dead) == len(bad), dead
    assert any(b'"unsigned"' in a for a in acks), acks
    assert "stream_infer_" in scraped["/metrics"]
    assert all(scraped.values()), scraped
    assert unsigned["id"] in logs and "rejected" in logs, logs[-4000:]
    assert "[DEBUG]" in logs, "the worker did not log at debug level"

    for secret in (password, hmac_key):
        assert secret not in logs
        for path, text in scraped.items():
            assert secret not in text, path
        for record in dead + acks:
            assert secret.encode() not in record


# -- a permission missing ---------------------------------------------------------------------


def scram256_setup(
    kafka: SecureKafka, tmp_path: Path, setups: list[Setup]
) -> tuple[Setup, str, int]:
    """A test's topics and a worker topology over SCRAM-SHA-256 with a fresh user; its
    principal and the worker's web port. No ACL is granted yet."""
    user, password = f"worker-{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    kafka.add_user(user, password, "SCRAM-SHA-256")
    setup = secured_setup(
        kafka,
        tmp_path,
        {
            "bootstrap_servers": kafka.address("SCRAM256"),
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "SCRAM-SHA-256",
            "sasl_username": user,
            "sasl_password": password,
        },
    )
    setups.append(setup)
    return setup, f"User:{user}", int(setup.doc["worker"]["web_port"])


def test_without_read_on_the_input_topic_the_worker_says_so_once_and_serves_once_granted(
    kafka: SecureKafka, tmp_path: Path, setups: list[Setup]
) -> None:
    setup, principal, port = scram256_setup(kafka, tmp_path, setups)
    topic = setup.topics.input
    acls = worker_acls(principal, setup)
    kafka.grant(without(acls, topic, AclOperation.READ))  # Describe stays, as documented
    setup.produce(good_events(N))
    started = time.monotonic()
    setup.start_worker(web_port=port)
    warnings = wait_warned(port, timeout_s=40)
    print(f"refused Read reported {time.monotonic() - started:.1f} s after the worker started")
    assert (
        len(warnings) == 1
        and f"Read on topic {topic!r} (TOPIC_AUTHORIZATION_FAILED)" in (warnings[0])
    ), warnings
    assert metric(port, "stream_infer_kafka_access_refused") == 1.0
    time.sleep(2.0)  # librdkafka retries the fetches meanwhile: still one line
    errors = logged(setup, "ERROR")
    assert len(errors) == 1 and f"Read on topic {topic!r}" in errors[0], errors
    assert "Traceback" not in setup.worker_logs()
    assert not [w for w in logged(setup, "WARNING") if "authoriz" in w.lower()]
    assert setup.workers[0].poll() is None, "the worker exited"

    kafka.grant([a for a in acls if a.name == topic and a.operation == AclOperation.READ])
    ids = {f"e-{i}" for i in range(N)}
    preds = setup.collect_until_ids(setup.topics.predictions, ids, timeout_s=40)
    assert sorted(p["id"] for p in preds) == sorted(ids), setup.worker_logs()
    assert healthy(port)
    assert metric(port, "stream_infer_kafka_access_refused") == 0.0


def test_without_write_on_the_acks_topic_the_worker_warns_and_still_serves_and_obeys(
    kafka: SecureKafka, tmp_path: Path, setups: list[Setup]
) -> None:
    setup, principal, port = scram256_setup(kafka, tmp_path, setups)
    acks_topic = setup.topics.acks or ""
    acls = worker_acls(principal, setup)
    kafka.grant(without(acls, acks_topic, AclOperation.WRITE))
    setup.start_worker(web_port=port)
    wait_ready(port)
    ctl = Controller(setup.topology)
    try:
        sent = ctl.send(new_command("status"))
        warnings = wait_warned(port, timeout_s=30)
        assert len(warnings) == 1, warnings
        assert f"Write on topic {acks_topic!r} (TOPIC_AUTHORIZATION_FAILED)" in warnings[0]
        retries = metric(
            port,
            "stream_infer_delivery_retries_total",
            topic=acks_topic,
            error="TOPIC_AUTHORIZATION_FAILED",
        )
        assert retries >= 1 and metric(port, "stream_infer_kafka_access_refused") == 1.0
        assert ctl.acks(sent["id"], wait_s=1.0) == []  # nothing got through

        serves_predictions(setup)  # the refused topic holds up nothing else
        # Nor later commands (a rollback must not wait for the ack of the one before).
        second = ctl.send(new_command("status"))
        deadline = time.monotonic() + 20
        while metric(port, "stream_infer_control_commands_total", status="applied") < 2:
            assert time.monotonic() < deadline, "the second command waited for the first's ack"
            time.sleep(0.2)

        errors = logged(setup, "ERROR")
        assert len(errors) == 1 and f"Write on topic {acks_topic!r}" in errors[0], errors
        assert not [w for w in logged(setup, "WARNING") if acks_topic in w]

        kafka.grant([a for a in acls if a.name == acks_topic and a.operation == AclOperation.WRITE])
        acks: list[dict[str, Any]] = []
        deadline = time.monotonic() + 20
        while len(acks) < 2 and time.monotonic() < deadline:
            acks += ctl.acks(None, wait_s=1.0)
    finally:
        ctl.close()
    # Both, once each, in the order they were applied.
    assert [(a["command_id"], a["status"]) for a in acks] == [
        (sent["id"], "applied"),
        (second["id"], "applied"),
    ], setup.worker_logs()
    assert healthy(port)


def serves_predictions(setup: Setup) -> None:
    setup.produce(good_events(N))
    ids = {f"e-{i}" for i in range(N)}
    preds = setup.collect_until_ids(setup.topics.predictions, ids, timeout_s=40)
    assert sorted(p["id"] for p in preds) == sorted(ids), setup.worker_logs()
