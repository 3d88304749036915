"""Model calls bounded in time.

Python cannot stop a thread, so a model that hangs cannot be interrupted. What can be bounded
is how long the serving path waits for it: :class:`Watchdog` runs each call on a dedicated
daemon thread and waits at most ``timeout_s``. A call that overruns raises
:class:`InferenceTimeout`; its thread is abandoned (it exits if the call ever returns) and a fresh
thread takes the next call.

Abandoned threads are counted per version while they are still hung. Once a version has
``max_hung`` of them, its calls are refused at once (``InferenceTimeout(refused=True)``) rather
than parking one more thread for ``timeout_s`` each: its events go to the dead-letter topic
quickly, and :attr:`Watchdog.hung` tells the health check that only a restart reclaims those
threads. A hung call that returns late frees its slot.

>>> key = ModelVersion("risk", "v1")
>>> dog = Watchdog(timeout_s=0.05, max_hung=1)
>>> dog.call(key, lambda: 42)
42
>>> release = threading.Event()
>>> dog.call(key, release.wait)  # hangs until released
Traceback (most recent call last):
  ...
stream_infer.errors.InferenceTimeout: model 'risk' version 'v1': no answer within 0.05s
>>> dog.hung
{ModelVersion(model='risk', version='v1'): 1}
>>> try:  # refused at once: max_hung calls of risk:v1 are hung
...     dog.call(key, lambda: 42)
... except InferenceTimeout as exc:
...     print("refused:", exc.refused)
refused: True
>>> release.set()  # the hung call returns late, and frees its slot
>>> dog.close()
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Generic, TypeVar

from stream_infer.core.events import ModelVersion
from stream_infer.errors import InferenceTimeout

log = logging.getLogger(__name__)
T = TypeVar("T")


class _Job(Generic[T]):
    __slots__ = ("fn", "future")

    def __init__(self, fn: Callable[[], T]) -> None:
        self.fn = fn
        self.future: Future[T] = Future()


class _Runner(threading.Thread):
    """One daemon thread running jobs in order; ``None`` tells it to exit."""

    def __init__(self, name: str, initializer: Callable[[], None] | None = None) -> None:
        super().__init__(name=name, daemon=True)
        self.jobs: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._initializer = initializer

    def run(self) -> None:
        if self._initializer is not None:
            try:
                self._initializer()
            except Exception:  # a performance setting: the runner must run jobs regardless
                log.exception("the model-call thread's initializer failed; running without it")
        while (job := self.jobs.get()) is not None:
            if not job.future.set_running_or_notify_cancel():
                continue
            try:
                job.future.set_result(job.fn())
            except BaseException as exc:  # handed to the waiting caller, whatever it is
                job.future.set_exception(exc)


class Watchdog:
    """Runs model calls with a time limit. One caller at a time (the inference thread).

    ``on_hung(key, n, timed_out)`` is called, from any thread, whenever a version's count of
    hung calls changes: ``timed_out`` is True when a call just overran, False when a hung call
    returned late.
    """

    def __init__(
        self,
        timeout_s: float,
        *,
        max_hung: int = 4,
        on_hung: Callable[[ModelVersion, int, bool], None] | None = None,
        initializer: Callable[[], None] | None = None,
    ) -> None:
        if timeout_s <= 0 or max_hung < 1:
            msg = "timeout_s must be > 0 and max_hung >= 1"
            raise ValueError(msg)
        self.timeout_s = timeout_s
        self.max_hung = max_hung
        self._on_hung = on_hung
        # Run first on every runner thread (the runtime sets the thread's torch intra-op
        # thread count there: it is per thread, see stream_infer.runtime.threads).
        self._initializer = initializer
        self._hung: dict[ModelVersion, int] = {}
        self._lock = threading.Lock()
        self._spawned = 0
        self._runner = self._new_runner()

    def _new_runner(self) -> _Runner:
        self._spawned += 1
        runner = _Runner(f"model-call-{self._spawned}", self._initializer)
        runner.start()
        return runner

    @property
    def hung(self) -> dict[ModelVersion, int]:
        """Calls still running past their limit, per (model, version)."""
        with self._lock:
            return {k: n for k, n in self._hung.items() if n}

    def saturated(self) -> list[ModelVersion]:
        """Versions whose calls are refused because ``max_hung`` of them are still hung."""
        return [k for k, n in self.hung.items() if n >= self.max_hung]

    def call(self, key: ModelVersion, fn: Callable[[], T]) -> T:
        """``fn()`` on the runner thread; its result, its exception, or InferenceTimeout."""
        model, version = key
        with self._lock:
            if self._hung.get(key, 0) >= self.max_hung:
                msg = (
                    f"{self._hung[key]} earlier calls are still hung past "
                    f"{self.timeout_s:g}s; calls refused until they return or the worker restarts"
                )
                raise InferenceTimeout(
                    msg, model=model, version=version, timeout_s=self.timeout_s, refused=True
                )
        job: _Job[T] = _Job(fn)
        self._runner.jobs.put(job)
        try:
            return job.future.result(timeout=self.timeout_s)
        except FutureTimeout:
            pass
        with self._lock:
            if job.future.done():  # it returned just now: not a hang
                return job.future.result()
            self._hung[key] = self._hung.get(key, 0) + 1
            hung = self._hung[key]
        job.future.add_done_callback(lambda _f: self._returned(key))
        self._runner.jobs.put(None)  # exit after the hung call, if it ever returns
        self._runner = self._new_runner()
        log.error(
            "%s:%s did not answer within %gs; its thread is abandoned (%d hung)",
            model,
            version,
            self.timeout_s,
            hung,
        )
        if self._on_hung is not None:
            self._on_hung(key, hung, True)
        msg = f"no answer within {self.timeout_s:g}s"
        raise InferenceTimeout(msg, model=model, version=version, timeout_s=self.timeout_s)

    def _returned(self, key: ModelVersion) -> None:
        with self._lock:
            self._hung[key] = hung = max(0, self._hung.get(key, 0) - 1)
        log.warning("a hung call of %s:%s returned late (%d still hung)", *key, hung)
        if self._on_hung is not None:
            self._on_hung(key, hung, False)

    def close(self) -> None:
        """Let the current runner exit. Hung threads are daemons: they do not block exit."""
        self._runner.jobs.put(None)
