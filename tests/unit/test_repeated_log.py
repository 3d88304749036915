"""Repeated log lines said once, then once per interval with a count (a broker outage logged
1,379 ERROR lines in 35 s); a fake clock, no sleeps."""

from __future__ import annotations

import logging

import pytest

from stream_infer.io.repeated_log import LibrdkafkaLog, RateLimitedLog, librdkafka_kind


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records]


def test_the_first_line_is_logged_then_one_per_interval_with_the_count(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    limited = RateLimitedLog(logging.getLogger("t.limit"), 10.0, clock=clock)
    caplog.set_level(logging.INFO, logger="t.limit")
    logged = []
    for _ in range(400):  # 40 a second for 10 s
        logged.append(limited.log(logging.ERROR, "refused", "connect to %s refused", "k:9092"))
        clock.now += 0.025
    logged.append(limited.log(logging.ERROR, "refused", "connect to %s refused", "k:9092"))
    assert logged.count(True) == 2 and logged[0] and logged[-1]
    assert _lines(caplog) == [
        ("ERROR", "connect to k:9092 refused"),
        ("ERROR", "connect to k:9092 refused (399 more like it in the last 10 s)"),
    ]


def test_each_key_has_its_own_interval(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    limited = RateLimitedLog(logging.getLogger("t.keys"), 30.0, clock=clock)
    caplog.set_level(logging.INFO, logger="t.keys")
    assert limited.log(logging.WARNING, ("producer", 1), "a")
    assert limited.log(logging.WARNING, ("consumer", 1), "b")
    assert not limited.log(logging.WARNING, ("producer", 1), "a")
    assert limited.log(logging.WARNING, ("producer", 2), "c")
    assert [m for _, m in _lines(caplog)] == ["a", "b", "c"]


def test_flush_due_tells_the_count_of_a_kind_that_stopped_repeating(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    limited = RateLimitedLog(logging.getLogger("t.flush"), 30.0, clock=clock)
    caplog.set_level(logging.INFO, logger="t.flush")
    limited.log(logging.ERROR, "k", "down %d", 1)
    clock.now += 1.0
    limited.log(logging.ERROR, "k", "down %d", 2)
    limited.log(logging.ERROR, "quiet", "once")
    clock.now += 20.0
    assert limited.flush_due() == 0  # the interval has not passed
    clock.now += 10.0
    assert limited.flush_due() == 1  # "quiet" had nothing suppressed: forgotten silently
    assert _lines(caplog)[-1] == ("ERROR", "down 2 (1 like it in the last 31 s)")
    assert limited.flush_due() == 0  # told once
    assert limited.log(logging.ERROR, "k", "down %d", 3)  # forgotten: logged at once, no count
    assert _lines(caplog)[-1] == ("ERROR", "down 3")


def test_the_kinds_remembered_are_bounded(clock: Clock) -> None:
    limited = RateLimitedLog(logging.getLogger("t.bound"), 30.0, clock=clock, max_keys=3)
    for key in range(5):
        assert limited.log(logging.ERROR, key, "x")
    assert len(limited._kinds) == 3
    assert limited.log(logging.ERROR, 0, "x")  # the oldest was forgotten
    assert not limited.log(logging.ERROR, 4, "x")


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        RateLimitedLog(logging.getLogger("t"), 0.0)


# What confluent-kafka's logger callback gives for the lines of one broker outage.
BOOTSTRAP = (
    "[thrd:127.0.0.1:33687/bootstrap]: 127.0.0.1:33687/bootstrap: Connect to "
    "ipv4#127.0.0.1:33687 failed: Connection refused (after 0ms in state CONNECT)"
)
NODE = (
    "[thrd:127.0.0.1:33687/1]: 127.0.0.1:33687/1: Connect to ipv4#127.0.0.1:33687 failed: "
    "Connection refused (after 12ms in state CONNECT, 3 identical error(s) suppressed)"
)
COORDINATOR = (
    "[thrd:GroupCoordinator]: GroupCoordinator: 127.0.0.1:33687: Connect to "
    "ipv4#127.0.0.1:33687 failed: Connection refused (after 1ms in state CONNECT)"
)


def test_one_kind_per_client_for_the_same_failure_through_any_broker_handle() -> None:
    kinds = {librdkafka_kind("si#consumer-1", "FAIL", t) for t in (BOOTSTRAP, NODE, COORDINATOR)}
    assert kinds == {
        (
            "si#consumer-1",
            "FAIL",
            "Connect to ipv4#127.0.0.1:33687 failed: Connection refused "
            "(after #ms in state CONNECT)",
        )
    }
    other = librdkafka_kind("si#consumer-1", "FAIL", BOOTSTRAP.replace("33687", "33688"))
    assert other not in kinds  # another broker's address: its own kind


def test_an_outage_through_the_librdkafka_logger_is_a_few_lines(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    rdkafka = LibrdkafkaLog(logging.getLogger("t.librdkafka"), 30.0, clock=clock)
    caplog.set_level(logging.DEBUG, logger="t.librdkafka")
    fmt = "%s [%s] %s"
    for _ in range(35 * 20):  # 35 s, 20 lines a second from each of two consumers
        for client in ("si#consumer-1", "si#consumer-2"):
            for text in (BOOTSTRAP, NODE, COORDINATOR):
                rdkafka.log(logging.ERROR, fmt, "FAIL", client, text)
        clock.now += 0.05
    rdkafka.log(logging.DEBUG, fmt, "FETCH", "si#consumer-1", "fetching")  # not limited
    rdkafka.log(logging.DEBUG, fmt, "FETCH", "si#consumer-1", "fetching")
    clock.now += 30.0
    rdkafka.flush_due()
    lines = _lines(caplog)
    errors = [m for level, m in lines if level == "ERROR"]
    # Each client: its first line, one with the count after 30 s, the rest told by flush_due.
    assert len(errors) == 6, errors
    assert sum(int(m.split(" (")[-1].split(" ")[0]) for m in errors if "like it" in m) == (
        2 * 3 * 700 - 4
    )
    assert [m for level, m in lines if level == "DEBUG"] == ["FETCH [si#consumer-1] fetching"] * 2
