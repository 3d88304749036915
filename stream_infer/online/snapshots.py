"""Where online learners' snapshots live, how they are written, and which one a worker restores.

Layout: ``<snapshot_dir>/<model>/<version>/<worker>.snapshot``, one file per worker, so that
several workers (pods) sharing one volume never write the same file. ``worker`` is the
worker's stable identity (``worker.id``, e.g. the pod name; the host name by default).

Restore rule (:meth:`SnapshotStore.load`): a worker restores its own file; when it has none (a
new pod of a Deployment, whose name is new), the most recently written snapshot of that
learner in the folder (another worker's, or the single file of releases before per-worker
names). A learner learns from the labels of the partitions its worker owns, so every snapshot is
of the same model fed a different share of the labels: the freshest is the best start.

A snapshot is refused, and the worker starts that learner afresh, when it cannot be read, is
corrupt (header, length, sha256), or was made for another topology (its features, kind or
scale differ from the topology's): an ERROR line, a count by reason, and the worker's own file
is renamed aside (``.rejected-<unix time>``) for inspection, never deleted, never crashing the
start.

Writes are atomic: a temporary file in the same folder, flushed and fsynced, renamed over the
old snapshot, then the folder fsynced. A failed write (full disk, no permission) leaves the
previous snapshot whole and raises :class:`OSError` to the caller. The learning thread calls
:meth:`SnapshotStore.write_all` (every ``snapshot_interval_s``, as :meth:`SnapshotStore.due`
says, and at stop), which logs a failure and goes on to the next learner.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from stream_infer.errors import ModelError
from stream_infer.online.learner import OnlineLearner

log = logging.getLogger(__name__)

SUFFIX = ".snapshot"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def worker_name(name: str) -> str:
    """A worker identity usable as a file name (anything but ``[A-Za-z0-9._-]`` becomes ``_``).

    >>> worker_name("pod/7:eu-west")
    'pod_7_eu-west'
    >>> worker_name("..")
    'worker'
    """
    safe = _UNSAFE.sub("_", name).strip(".") or "worker"
    return safe[:128]


@dataclass(frozen=True, slots=True)
class Restored:
    """What :meth:`SnapshotStore.load` found: a learner (or None: start afresh), the file it
    came from, and why a snapshot was refused (None when none was)."""

    learner: OnlineLearner | None
    path: Path | None
    refused: str | None = None
    reason: str | None = None  # unreadable | corrupt | mismatch


class SnapshotStore:
    """The snapshots of one worker's learners under ``folder``, written every ``interval_s``
    (``clock``: monotonic seconds).

    >>> now = [0.0]
    >>> store = SnapshotStore(Path("state"), "pod-0", interval_s=60.0, clock=lambda: now[0])
    >>> store.path("risk", "online").as_posix()
    'state/risk/online/pod-0.snapshot'
    >>> store.due()
    False
    >>> now[0] = 60.0
    >>> store.due(), store.due()
    (True, False)
    """

    def __init__(
        self,
        folder: Path,
        worker: str,
        *,
        interval_s: float = math.inf,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.folder = folder
        self.worker = worker_name(worker)
        self.interval_s = interval_s
        self._clock = clock
        self._due_from = clock()  # the first write is one interval after the start

    def due(self) -> bool:
        """Whether the next periodic write is due (``interval_s`` since the last one, or since
        the start); when it is, the next interval starts now."""
        now = self._clock()
        if now - self._due_from < self.interval_s:
            return False
        self._due_from = now
        return True

    def path(self, model: str, version: str) -> Path:
        """This worker's snapshot file of one learner."""
        return self.folder / model / version / f"{self.worker}{SUFFIX}"

    def legacy_path(self, model: str, version: str) -> Path:
        """The one shared file of releases before per-worker names."""
        return self.folder / f"{model}--{version}{SUFFIX}"

    def candidates(self, model: str, version: str) -> list[Path]:
        """The files a worker may restore, in the order it tries them: its own, then the
        others newest first (only the first that exists is restored; see the module doc)."""
        own = self.path(model, version)
        if own.exists():
            return [own]
        others = [p for p in own.parent.glob(f"*{SUFFIX}") if p.is_file()]
        legacy = self.legacy_path(model, version)
        if legacy.is_file():
            others.append(legacy)

        def written(p: Path) -> float:
            try:
                return p.stat().st_mtime
            except OSError:
                return 0.0

        return sorted(others, key=written, reverse=True)

    def write(self, learner: OnlineLearner) -> Path:
        """Write the learner's snapshot atomically. Raises OSError; the old file stays whole."""
        path = self.path(learner.model, learner.version)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = learner.snapshot()
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with tmp.open("wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        return path

    def write_all(self, learners: Iterable[OnlineLearner]) -> int:
        """Write every learner's snapshot. Never raises: a failure (full disk, no permission)
        is an ERROR line, the previous snapshot stays whole and the next learner is written.
        Returns how many failed."""
        failed = 0
        for learner in learners:
            try:
                self.write(learner)
            except Exception as exc:
                failed += 1
                log.error(
                    "snapshot of learner %s:%s not written (%s: %s); the previous one stays",
                    learner.model,
                    learner.version,
                    type(exc).__name__,
                    exc,
                )
        return failed

    def restore(
        self,
        model: str,
        version: str,
        *,
        features: Sequence[str],
        kind: str,
        scale: bool,
    ) -> Restored:
        """:meth:`load`, logged: INFO when a learner is restored, ERROR when a snapshot is
        refused (the learner starts afresh)."""
        found = self.load(model, version, features=features, kind=kind, scale=scale)
        if found.learner is not None:
            log.info(
                "restored learner %s:%s from %s (%d learned)",
                model,
                version,
                found.path,
                found.learner.n_learned,
            )
        elif found.refused is not None:
            log.error(
                "learner %s:%s starts afresh: snapshot %s refused: %s",
                model,
                version,
                found.path,
                found.refused,
            )
        return found

    def load(
        self,
        model: str,
        version: str,
        *,
        features: Sequence[str],
        kind: str,
        scale: bool,
    ) -> Restored:
        """The learner to start from (see the module doc for the rule). Never raises for a bad
        snapshot: the result says why it was refused."""
        found = self.candidates(model, version)
        if not found:
            return Restored(None, None)
        path = found[0]
        try:
            data = path.read_bytes()
        except OSError as exc:
            return Restored(None, path, f"cannot be read: {exc}", "unreadable")
        try:
            learner = OnlineLearner.restore(data, model=model, version=version)
        except ModelError as exc:
            return self._refuse(path, str(exc), "corrupt")
        expected = {"features": tuple(features), "kind": kind, "scale": scale}
        stored = {"features": learner.features, "kind": learner.kind, "scale": learner.scale}
        differs = [k for k in expected if expected[k] != stored[k]]
        if differs:
            what = "; ".join(f"{k} {stored[k]!r}, the topology's {expected[k]!r}" for k in differs)
            return self._refuse(path, f"made for another topology: {what}", "mismatch")
        return Restored(learner, path)

    def _refuse(self, path: Path, why: str, reason: str) -> Restored:
        """Rename this worker's own (or the legacy) file aside; another worker's stays (it
        overwrites it at its next snapshot)."""
        mine = path.name == f"{self.worker}{SUFFIX}" or path.parent == self.folder
        if mine:
            aside = path.with_name(f"{path.name}.rejected-{int(time.time())}")
            try:
                path.replace(aside)
                why += f" (kept as {aside.name})"
            except OSError as exc:
                why += f" (could not be renamed aside: {exc})"
        return Restored(None, path, why, reason)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX: the directory entry is the folder's data)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not possible on every platform or file system: the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
