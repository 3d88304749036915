"""Access: the whole worker against a broker that requires TLS or SASL/SCRAM, and no secret
leaks into its logs, its metrics or its dead letters.

The security settings must reach every client the worker creates: the admin client (topic
check and creation at start), the control-log consumer (replayed before serving), the input
consumer and the producer (predictions, dead letters, acks). A worker that serves N events
end to end and answers a control command has used all of them through the secured listener;
clients without the right credentials are refused there, so these tests fail if the security
were not enforced.

The broker is the embedded tansu, each test its own. tansu 0.6.0 cannot serve TLS or SCRAM
itself (``--cert`` and ``--key`` conflict in its argument parser; SCRAM users cannot be created
once ``--authentication`` is on and are not stored without it; details in secure_front.py), so
a small TLS/SCRAM front (tests/integration/secure_front.py) stands before it and tansu
advertises the front's address. What is tested is the client side: stream-infer's settings,
librdkafka's TLS (CA, hostname, client certificate) and SCRAM-SHA-256/512.
"""

from __future__ import annotations

import contextlib
import ssl
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient

from stream_infer.broker import EmbeddedBroker, free_port
from stream_infer.controller import Controller, new_command
from stream_infer.settings import bootstrap_for_tests, docker_requested
from tests.integration.conftest import Setup, good_events
from tests.integration.secure_front import Certs, SecureFront, make_certs, server_tls

N = 300
USER = "stream-infer"


@pytest.fixture(autouse=True)
def _embedded_broker_only() -> None:
    if bootstrap_for_tests() or docker_requested():
        pytest.skip("puts a TLS/SASL front before its own embedded broker: embedded broker only")


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return make_certs(tmp_path / "tls")


@contextlib.contextmanager
def secured_broker(
    tmp_path: Path, *, tls: ssl.SSLContext | None = None, users: dict[str, str] | None = None
) -> Iterator[str]:
    """Plaintext tansu behind a TLS and/or SCRAM front; yields the front's address."""
    port = free_port()
    log_path = tmp_path / "tansu.log"
    with (
        EmbeddedBroker(advertised=f"127.0.0.1:{port}", log_path=log_path) as broker,
        SecureFront(("127.0.0.1", broker.port), port, tls=tls, users=users) as front,
    ):
        yield front.address


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


def serves_end_to_end(setup: Setup) -> None:
    """N events in, N predictions out, and a control command answered: every client works."""
    setup.produce(good_events(N))
    ids = {f"e-{i}" for i in range(N)}
    preds = setup.collect_until_ids(setup.topics.predictions, ids, timeout_s=40)
    assert {p["id"] for p in preds} == ids, setup.worker_logs()
    ctl = Controller(setup.topology)
    try:
        acks = ctl.acks(ctl.send(new_command("status"))["id"], wait_s=20, workers=1)
    finally:
        ctl.close()
    assert [a["status"] for a in acks] == ["applied"], setup.worker_logs()
    assert setup.workers[0].poll() is None


def test_worker_serves_through_mutual_tls(tmp_path: Path, certs: Certs) -> None:
    files = {
        "ssl.ca.location": str(certs.ca),
        "ssl.certificate.location": str(certs.client_cert),
        "ssl.key.location": str(certs.client_key),
    }
    with secured_broker(tmp_path, tls=server_tls(certs, require_client_cert=True)) as bootstrap:
        setup = Setup(
            bootstrap,
            tmp_path,
            client_conf={"security.protocol": "SSL"} | files,
            kafka={"security_protocol": "SSL"} | {k.replace(".", "_"): v for k, v in files.items()},
        )
        try:
            setup.start_worker()  # it boots while the refusals are checked
            refusal(bootstrap, {})  # plaintext
            refusal(bootstrap, {"security.protocol": "SSL", "ssl.ca.location": str(certs.ca)})
            serves_end_to_end(setup)
        finally:
            setup.stop()


def test_worker_serves_through_sasl_ssl_with_scram_sha_512(tmp_path: Path, certs: Certs) -> None:
    password = f"pw-{uuid.uuid4().hex}"
    sasl = {"sasl.mechanism": "SCRAM-SHA-512", "sasl.username": USER, "sasl.password": password}
    tls_only = {"security.protocol": "SSL", "ssl.ca.location": str(certs.ca)}
    client = tls_only | {"security.protocol": "SASL_SSL"} | sasl
    with secured_broker(
        tmp_path, tls=server_tls(certs, require_client_cert=False), users={USER: password}
    ) as bootstrap:
        setup = Setup(
            bootstrap,
            tmp_path,
            client_conf=client,
            kafka={
                "security_protocol": "SASL_SSL",
                "ssl_ca_location": str(certs.ca),
                "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_username": USER,
                "sasl_password": password,
            },
        )
        try:
            setup.start_worker()
            refusal(bootstrap, tls_only)  # TLS but no login
            wrong = refusal(
                bootstrap, client | {"sasl.password": "not-it"}, KafkaError._AUTHENTICATION
            )
            assert any(e.code() == KafkaError._AUTHENTICATION for e in wrong), wrong
            serves_end_to_end(setup)
        finally:
            setup.stop()


def send_unsigned(setup: Setup, client: dict[str, Any], doc: dict[str, Any]) -> list[str]:
    """Produce a command without a signature; the reasons in the workers' acks."""
    ctl = Controller(setup.topology)  # reads acks from the end: before the command goes out
    producer = Producer({"bootstrap.servers": setup.bootstrap} | client)
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


def test_no_secret_in_logs_metrics_or_dead_letters(tmp_path: Path) -> None:
    """SASL_PLAINTEXT with SCRAM-SHA-256, a control HMAC key, a worker logging at debug: bad
    events and an unsigned command make it write dead letters, acks and warnings; neither the
    password nor the key may appear in any of them, nor in /metrics, /healthz, /readyz."""
    password = f"pw-{uuid.uuid4().hex}"
    hmac_key = f"hk-{uuid.uuid4().hex}"
    sasl = {"sasl.mechanism": "SCRAM-SHA-256", "sasl.username": USER, "sasl.password": password}
    client = {"security.protocol": "SASL_PLAINTEXT"} | sasl
    with secured_broker(tmp_path, users={USER: password}) as bootstrap:
        setup = Setup(
            bootstrap,
            tmp_path,
            client_conf=client,
            kafka={
                "security_protocol": "SASL_PLAINTEXT",
                "sasl_mechanism": "SCRAM-SHA-256",
                "sasl_username": USER,
                "sasl_password": password,
            },
            control={"hmac_key": hmac_key},
        )
        try:
            bad: list[tuple[bytes | None, bytes]] = [
                (b"b1", b"not json"),
                (b"b2", b'{"id": "x-2"}'),
                (None, b"\xff\xfe binary"),
            ]
            web_port = free_port()
            setup.start_worker(web_port=web_port, log_level="debug")
            refusal(bootstrap, {})  # no login
            wrong = refusal(
                bootstrap, client | {"sasl.username": "other"}, KafkaError._AUTHENTICATION
            )
            assert any(e.code() == KafkaError._AUTHENTICATION for e in wrong), wrong
            setup.produce(bad)
            serves_end_to_end(setup)  # its status command is signed: the topology has the key
            unsigned = new_command("swap", model="risk", version="v2")
            assert send_unsigned(setup, client, unsigned) == ["unsigned"]
            dead = _raw_records(setup, setup.topics.dead_letter, until=len(bad))
            acks = _raw_records(setup, setup.topics.acks or "", until=2)
            scraped = {
                path: _get(f"http://127.0.0.1:{web_port}{path}")
                for path in ("/metrics", "/healthz", "/readyz")
            }
        finally:
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
