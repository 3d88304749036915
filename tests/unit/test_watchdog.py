"""Watchdog: model calls bounded in time, hung threads counted and capped."""

from __future__ import annotations

import threading
import time

import pytest

from stream_infer.core.watchdog import Watchdog
from stream_infer.errors import InferenceTimeout

KEY = ("risk", "v1")
OTHER = ("risk", "v2")


def test_a_call_returns_its_result_from_another_thread() -> None:
    dog = Watchdog(5.0)
    caller = threading.get_ident()
    assert dog.call(KEY, threading.get_ident) != caller
    assert dog.call(KEY, lambda: 42) == 42
    assert dog.hung == {}


def test_an_exception_reaches_the_caller_unchanged() -> None:
    dog = Watchdog(5.0)

    def boom() -> int:
        raise ZeroDivisionError("no")

    with pytest.raises(ZeroDivisionError, match="no"):
        dog.call(KEY, boom)
    assert dog.call(KEY, lambda: 1) == 1  # the runner survives it


def test_a_hung_call_times_out_and_the_next_call_gets_a_fresh_thread() -> None:
    seen: list[tuple[tuple[str, str], int, bool]] = []
    dog = Watchdog(0.1, on_hung=lambda key, n, timed_out: seen.append((key, n, timed_out)))
    release = threading.Event()
    hung_thread: list[threading.Thread] = []

    def hang() -> int:
        hung_thread.append(threading.current_thread())
        release.wait()
        return 0

    started = time.monotonic()
    with pytest.raises(InferenceTimeout) as info:
        dog.call(KEY, hang)
    assert time.monotonic() - started < 5
    assert not info.value.refused
    assert (info.value.model, info.value.version, info.value.timeout_s) == ("risk", "v1", 0.1)
    assert dog.hung == {KEY: 1}
    assert seen == [(KEY, 1, True)]
    assert hung_thread[0].daemon  # an abandoned thread never blocks the process's exit

    # The hung thread still holds its call; the next one runs elsewhere, at once.
    assert dog.call(KEY, lambda: 7) == 7

    release.set()
    hung_thread[0].join(5)
    assert not hung_thread[0].is_alive()  # it returned, then exited
    assert dog.hung == {}
    assert seen[-1] == (KEY, 0, False)


def test_past_max_hung_a_version_is_refused_at_once_and_others_are_not() -> None:
    dog = Watchdog(0.05, max_hung=2)
    release = threading.Event()
    ran: list[str] = []

    for _ in range(2):
        with pytest.raises(InferenceTimeout):
            dog.call(KEY, release.wait)
    assert dog.saturated() == [KEY]

    def tracked() -> int:
        ran.append("ran")
        return 1

    with pytest.raises(InferenceTimeout) as info:
        dog.call(KEY, tracked)
    assert info.value.refused
    assert "2 earlier calls are still hung" in str(info.value)
    assert ran == []  # refused without running
    assert dog.call(OTHER, tracked) == 1  # another version is not affected

    release.set()
    deadline = time.monotonic() + 5
    while dog.hung and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dog.saturated() == []
    assert dog.call(KEY, tracked) == 1  # served again once the hung calls returned


def test_invalid_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        Watchdog(0)
    with pytest.raises(ValueError, match="max_hung"):
        Watchdog(1.0, max_hung=0)


def test_every_runner_thread_runs_the_initializer_first_a_fresh_one_after_a_hang_too() -> None:
    """The runtime sets torch's intra-op thread count in it: per thread, so it must run on the
    thread that runs the model, also on the one spawned after a hung call."""
    initialized: list[str] = []
    release = threading.Event()
    dog = Watchdog(
        timeout_s=0.1,
        max_hung=2,
        initializer=lambda: initialized.append(threading.current_thread().name),
    )
    first = dog.call(KEY, lambda: threading.current_thread().name)
    assert initialized == [first]
    with pytest.raises(InferenceTimeout):
        dog.call(KEY, release.wait)
    second = dog.call(KEY, lambda: threading.current_thread().name)
    assert second != first and initialized == [first, second]
    release.set()
