"""Subprocesses the bench starts, and the CPU and memory they use.

Every process the bench starts goes through :class:`Supervisor`: its own session (so a signal
reaches its whole group and never the bench), a parent-death signal (so it dies with the bench
even if the bench is SIGKILLed), and a log file. :meth:`Supervisor.stop_all` ends every group
it started: SIGTERM, a grace period, then SIGKILL.

:class:`TreeSampler` samples the process trees of the system under test (user+sys CPU seconds,
RSS) and the broker's CPU, every ``interval_s``, in a thread. Windows are in wall-clock seconds
(``time.time()``), the clock the prediction reader and the events' ``ts`` use.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil  # type: ignore[import-untyped]

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGKILL this child when the bench (the thread that started it) dies."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The bench's environment without STREAM_INFER_* overrides (topology files say it all)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_INFER_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env | (extra or {})


@dataclass
class Started:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    started_at: float


class Supervisor:
    """Starts subprocesses in their own sessions and makes sure every one of them ends."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._running: list[Started] = []

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> Started:
        if threading.current_thread() is not threading.main_thread():
            # PR_SET_PDEATHSIG fires when the *thread* that forked exits.
            msg = "start subprocesses from the main thread only"
            raise RuntimeError(msg)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env if env is not None else clean_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 (prctl only)
            )
        started = Started(name, proc, log_path, time.time())
        self._running.append(started)
        log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(cmd))
        return started

    def stop(self, started: Started, grace_s: float = 10.0) -> float:
        """SIGTERM the process group, SIGKILL it after ``grace_s``. Returns seconds taken."""
        t0 = time.monotonic()
        proc = started.proc
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                log.info("%s did not stop within %.0fs; killing it", started.name, grace_s)
        # The leader may be gone while others of its group live on: kill the group regardless.
        _signal_group(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        if started in self._running:
            self._running.remove(started)
        return time.monotonic() - t0

    def stop_many(self, started: list[Started], grace_s: float = 10.0) -> None:
        """SIGTERM them all at once, then wait (so grace periods do not add up)."""
        for s in started:
            if s.proc.poll() is None:
                _signal_group(s.proc.pid, signal.SIGTERM)
        for s in started:
            self.stop(s, grace_s)

    def stop_all(self, grace_s: float = 5.0) -> None:
        self.stop_many(list(self._running), grace_s)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def rss_of(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # time.time()
    cpu_s: float  # user+sys of the system's process trees
    rss_bytes: int  # summed over the trees
    broker_cpu_s: float
    harness_cpu_s: float  # the bench process itself: load generator, reader, sampler


class TreeSampler:
    """Samples CPU and RSS of process trees (and the broker's CPU) in a thread."""

    def __init__(self, pids: list[int], broker_pid: int | None, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self._roots = [psutil.Process(pid) for pid in pids]
        self._broker = psutil.Process(broker_pid) if broker_pid else None
        self._harness = psutil.Process()
        self._known: dict[int, psutil.Process] = {}
        self._dead_cpu_s = 0.0  # CPU of tree members that exited, as last seen
        self._last_cpu: dict[int, float] = {}
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-sampler", daemon=True)

    def start(self) -> TreeSampler:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def _members(self) -> list[psutil.Process]:
        members: list[psutil.Process] = []
        for root in self._roots:
            with contextlib.suppress(psutil.Error):
                members.append(root)
                members.extend(root.children(recursive=True))
        out = []
        for p in members:
            known = self._known.setdefault(p.pid, p)
            out.append(known)
        return out

    def sample(self) -> Sample:
        cpu = 0.0
        rss = 0
        seen: set[int] = set()
        for p in self._members():
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    mem = p.memory_info().rss
            except psutil.Error:
                continue
            seen.add(p.pid)
            self._last_cpu[p.pid] = t.user + t.system
            cpu += t.user + t.system
            rss += mem
        for pid in list(self._last_cpu):
            if pid not in seen:  # exited: keep what it had used
                self._dead_cpu_s += self._last_cpu.pop(pid)
                self._known.pop(pid, None)
        broker_cpu = 0.0
        if self._broker is not None:
            with contextlib.suppress(psutil.Error):
                bt = self._broker.cpu_times()
                broker_cpu = bt.user + bt.system
        ht = self._harness.cpu_times()
        s = Sample(time.time(), cpu + self._dead_cpu_s, rss, broker_cpu, ht.user + ht.system)
        self.samples.append(s)
        return s

    @property
    def peak_rss_bytes(self) -> int:
        return max((s.rss_bytes for s in self.samples), default=0)

    def cpu_between(self, t0: float, t1: float) -> dict[str, float]:
        """CPU seconds of the system, the broker and the harness between two wall-clock times."""
        return {
            name: _interp(self.samples, t1, field) - _interp(self.samples, t0, field)
            for name, field in (
                ("system", "cpu_s"),
                ("broker", "broker_cpu_s"),
                ("harness", "harness_cpu_s"),
            )
        }


def _interp(samples: list[Sample], t: float, field: str) -> float:
    """A cumulative counter at time t, linearly interpolated between the nearest samples."""
    if not samples:
        return 0.0
    if t <= samples[0].at:
        return float(getattr(samples[0], field))
    for a, b in itertools.pairwise(samples):
        if a.at <= t <= b.at:
            va, vb = float(getattr(a, field)), float(getattr(b, field))
            span = b.at - a.at
            return va if span <= 0 else va + (vb - va) * (t - a.at) / span
    return float(getattr(samples[-1], field))
