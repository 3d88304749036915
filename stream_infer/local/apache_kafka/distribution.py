"""Apache Kafka's jars, resolved from Maven Central by ``pom.xml`` beside this file.

``mvn dependency:copy-dependencies`` copies the broker and its runtime dependencies into a
cache outside the repository (``~/.cache/stream-infer/apache-kafka/<version>-<pom hash>``, or
under ``$STREAM_INFER_CACHE_DIR``), once; later runs only check a stamp. Maven keeps its own
download cache in ``~/.m2`` too. Needs ``java`` (17 or newer) and ``mvn`` on PATH; without them
:func:`missing_tools` says what is missing in one line and :func:`kafka_classpath` raises.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from stream_infer.errors import BrokerError

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
POM = HERE / "pom.xml"
LOG4J_CONFIG = HERE / "log4j2.properties"
MIN_JAVA = 17


def kafka_version() -> str:
    """The Apache Kafka version the pom pins."""
    found = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", POM.read_text())
    if not found:  # pragma: no cover - the pom is part of the package
        raise BrokerError(f"{POM} names no <kafka.version>")
    return found.group(1).strip()


def cache_root(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    base = env.get("STREAM_INFER_CACHE_DIR") or str(Path.home() / ".cache" / "stream-infer")
    return Path(base) / "apache-kafka"


def _java_major(java: str) -> int | None:
    try:
        out = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not found:
        return None
    major = int(found.group(1))
    return int(found.group(2) or 0) if major == 1 else major


def missing_tools() -> str | None:
    """None when Apache Kafka can be resolved and run here, else one line saying why not."""
    java = shutil.which("java")
    if java is None:
        return f"no `java` on PATH (Apache Kafka {kafka_version()} needs Java {MIN_JAVA}+)"
    major = _java_major(java)
    if major is None or major < MIN_JAVA:
        return f"`java` is version {major}; Apache Kafka {kafka_version()} needs {MIN_JAVA}+"
    if shutil.which("mvn") is None and not _stamp_ok(_libs_dir()):
        return f"no `mvn` on PATH to resolve Apache Kafka {kafka_version()} from Maven Central"
    return None


def _libs_dir() -> Path:
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()[:12]
    return cache_root() / f"{kafka_version()}-{digest}" / "libs"


def _stamp_ok(libs: Path) -> bool:
    stamp = libs.parent / "resolved"
    return stamp.is_file() and any(libs.glob("kafka_2.13-*.jar"))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One resolver at a time (two test runs starting together share one cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def kafka_classpath() -> str:
    """The broker's classpath, resolving it from Maven Central on first use."""
    why = missing_tools()
    if why:
        raise BrokerError(f"cannot run Apache Kafka: {why}")
    libs = _libs_dir()
    with _locked(libs.parent / ".lock"):
        if not _stamp_ok(libs):
            _resolve(libs)
    return str(libs / "*")


def _resolve(libs: Path) -> None:
    tmp = libs.with_name("libs.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        "mvn",
        "-B",
        "-q",
        "-f",
        str(POM),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={tmp}",
        "-DincludeScope=runtime",
    ]
    print(  # noqa: T201 - progress of a long first-time step, on the terminal
        f"resolving Apache Kafka {kafka_version()} from Maven Central into {libs.parent} "
        "(once; later runs reuse it)",
        flush=True,
    )
    started = time.monotonic()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BrokerError(f"`{' '.join(cmd)}` did not finish in 900 s") from exc
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-2000:]
        msg = f"`{' '.join(cmd)}` failed with exit code {done.returncode}:\n{tail}"
        raise BrokerError(msg)
    shutil.rmtree(libs, ignore_errors=True)
    tmp.rename(libs)
    (libs.parent / "resolved").write_text(f"{kafka_version()}\n")
    log.info(
        "resolved Apache Kafka %s (%d jars) in %.1f s",
        kafka_version(),
        len(list(libs.glob("*.jar"))),
        time.monotonic() - started,
    )
