"""Reading the control log: every worker reads every command, in log order.

A group-less consumer (partitions assigned, never subscribed) per worker, from the beginning:
this is how every worker sees every command (a consumer group would split them among workers,
and faust's GlobalTable was seen not to reach every worker, faust-streaming#283). At start the
worker replays what the log holds before it serves; afterwards a thread hands each new command
over as it arrives.

The follow thread runs before the batch source does (that one starts once the routing loads),
so it also tells the :class:`Reachability` what it learns: a command or a partition's end
fetched is a broker answering; and while an outage is marked it asks the cluster for the
control topic's metadata every ``probe_interval_s`` (a fresh answer clears the mark, a request
no broker answered keeps it), so a stale mark does not outlive the outage.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from stream_infer.errors import BrokerError
from stream_infer.io.access import AccessRefusals, is_refusal
from stream_infer.io.clients import assign_partitions, consume_ready, groupless_consumer_config
from stream_infer.io.reachability import Reachability, no_broker_answered
from stream_infer.io.repeated_log import RateLimitedLog

log = logging.getLogger(__name__)


class ControlLog:
    """``access``: where a refused Read on the control topic is noted (a /healthz warning:
    later commands are not applied until it is granted); ``reachability``: told what the follow
    thread learns of the cluster."""

    def __init__(
        self,
        conf: dict[str, Any],
        topic: str,
        *,
        access: AccessRefusals | None = None,
        reachability: Reachability | None = None,
    ) -> None:
        self.topic = topic
        self.access = access if access is not None else AccessRefusals()
        self.reachability = reachability if reachability is not None else Reachability()
        self.probe_interval_s = 5.0  # metadata asked this often while an outage is marked
        self.probe_timeout_s = 1.0
        self._probed_at = time.monotonic()
        self._consumer = Consumer(
            groupless_consumer_config(conf, "control")
            | {
                "enable.auto.offset.store": False,
                # The replay's end: an event when a partition is read to its end.
                "enable.partition.eof": True,
            }
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: Exception | None = None  # what killed the follow thread
        self._repeats = RateLimitedLog(log)  # errors librdkafka retries: once per interval

    def replay(self, timeout_s: float = 30.0) -> list[Message]:
        """Every command already in the log, in order (blocking; call before serving)."""
        meta = self._consumer.list_topics(self.topic, timeout=timeout_s).topics.get(self.topic)
        if meta is None or meta.error is not None or not meta.partitions:
            msg = f"control topic {self.topic!r} does not exist"
            raise BrokerError(msg)
        if len(meta.partitions) != 1:
            log.warning(
                "control topic %s has %d partitions; commands are only totally ordered with one",
                self.topic,
                len(meta.partitions),
            )
        parts = assign_partitions(self._consumer, {self.topic: meta.partitions}, OFFSET_BEGINNING)
        # The end is the high watermark when the replay begins. A partition is read to it when
        # the consumer's position (the offset after the last record or transaction marker it
        # went past) reaches it, or librdkafka says the partition is at its end. Not from the
        # offsets of the records returned: a transaction marker takes an offset and is never
        # returned, and with every record deleted (low = high > 0) none is returned at all.
        ends: dict[int, int] = {}
        for p in parts:
            low, high = self._consumer.get_watermark_offsets(p, timeout=timeout_s)
            if high > max(low, 0):
                ends[p.partition] = high
        out: list[Message] = []
        deadline = time.monotonic() + timeout_s
        while ends:
            if time.monotonic() > deadline:
                msg = f"could not read the control log {self.topic!r} within {timeout_s}s"
                raise BrokerError(msg)
            for msg_ in consume_ready(self._consumer, 500, 0.2):
                error = msg_.error()
                if error is None:
                    out.append(msg_)
                elif error.code() == KafkaError._PARTITION_EOF and (
                    (msg_.offset() or 0) >= ends.get(msg_.partition() or 0, 0)
                ):
                    ends.pop(msg_.partition() or 0, None)
            positions = self._consumer.position(
                [TopicPartition(self.topic, p) for p in sorted(ends)]
            )
            for tp in positions:
                if tp.offset >= ends[tp.partition]:
                    del ends[tp.partition]
        return out

    def follow(self, hand_off: Callable[[Message], None]) -> None:
        """Hand every later command over, from a thread, until :meth:`close`."""

        def run() -> None:
            try:
                while not self._stop.is_set():
                    self._follow_step(hand_off)
            except Exception as exc:  # reported by alive/error (/healthz), not lost
                self.error = exc
                log.critical("the control-log thread died", exc_info=True)

        self._thread = threading.Thread(target=run, name="control-log", daemon=True)
        self._thread.start()

    def _follow_step(self, hand_off: Callable[[Message], None]) -> None:
        """One turn of the follow thread: what was fetched handed over (a command or a
        partition's end fetched: a broker answered), then the cluster asked when due."""
        for msg in consume_ready(self._consumer, 100, 0.2):
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self.reachability.reached()
                self._error(err)
                continue
            self.reachability.reached()
            if self.access.active:
                self.access.allowed("topic", self.topic)
            hand_off(msg)
        self._probe()

    def _probe(self) -> None:
        """While an outage is marked, ask for the control topic's metadata every
        ``probe_interval_s``: the fresh answer that clears a stale mark (an idle log fetches
        nothing new, and the batch source may not run yet)."""
        now = time.monotonic()
        if self.reachability.mark is None or now - self._probed_at < self.probe_interval_s:
            return
        self._probed_at = now
        try:
            self._consumer.list_topics(self.topic, timeout=self.probe_timeout_s)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if isinstance(err, KafkaError) and no_broker_answered(err, full_timeout=True):
                return  # still unreachable: the mark stands
            self._repeats.log(
                logging.WARNING, "probe", "control log %s: metadata: %s", self.topic, exc
            )
            return
        self.reachability.reached()

    def flush_due(self) -> int:
        """Say the counts of errors suppressed whose interval passed (the report timer calls
        it). Returns the lines logged."""
        return self._repeats.flush_due()

    def _error(self, err: KafkaError) -> None:
        """A fatal consumer error ends the thread (raised: /healthz 500); a refused Read is
        noted (an ERROR line once, a /healthz warning) while librdkafka retries; others are
        logged once per kind and interval, with a count."""
        if err.code() == KafkaError._PARTITION_EOF:
            return
        if err.fatal():
            raise KafkaException(err)
        if err.code() == KafkaError.GROUP_AUTHORIZATION_FAILED:
            # This consumer joins no group and commits nothing: librdkafka still looks its
            # (random) group's coordinator up, which a principal without group ACLs is refused.
            # Nothing the control log needs.
            return
        if is_refusal(err):
            self.access.refused("topic", self.topic, "Read", err.name())
        else:
            self._repeats.log(
                logging.WARNING,
                err.code(),
                "control log %s: %s (librdkafka retries)",
                self.topic,
                err.str(),
            )

    @property
    def alive(self) -> bool:
        """Whether the thread :meth:`follow` started still hands commands over."""
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._consumer.close()
