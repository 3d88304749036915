"""This worker's side of the control plane: the control log applied to the routing table, what
the table routes loaded and served, and each live command acknowledged.

At start the whole log is replayed onto a fresh table (:meth:`ControlPlane.rebuild`) and only
what it ends with is loaded. Live, each command is parsed, validated and applied on the loader
thread (:meth:`ControlPlane.apply`); applied or rejected is decided by the table from the log
alone, so the table is the same on every worker. A routing that does not load is not a
rejection: the last routing that loaded keeps serving, :attr:`Models.problem` says why, and
the load is retried every ``retry_s``. Once the inference thread has finished every batch
served by the old routing, the ack goes to the acks topic.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import TIMESTAMP_LOG_APPEND_TIME, Message

from stream_infer.core import control
from stream_infer.core.control import Command, RoutingTable, encode_ack, parse_command
from stream_infer.core.events import ModelVersion, OutRecord
from stream_infer.errors import ControlError
from stream_infer.observability import Metrics
from stream_infer.online.learner import OnlineLearner
from stream_infer.runtime.kafka import KafkaClients
from stream_infer.runtime.models import Models
from stream_infer.runtime.threads import Threads
from stream_infer.settings import Topology

log = logging.getLogger(__name__)


class ControlPlane:
    """The routing table and the commands applied to it.

    ``on_reset``: a learner of this model was reset (its monitors start afresh).
    ``on_served``: after each live command and load retry (the worker starts consuming once a
    routing serves).
    """

    def __init__(
        self,
        topology: Topology,
        metrics: Metrics,
        models: Models,
        kafka: KafkaClients,
        threads: Threads,
        *,
        worker_id: str,
        on_reset: Callable[[str], None] = lambda _model: None,
        on_served: Callable[[], None] = lambda: None,
        rollout_driver: Callable[[], dict[str, Any] | None] = lambda: None,
    ) -> None:
        self.topology = topology
        self.metrics = metrics
        self.models = models
        self.kafka = kafka
        self.threads = threads
        self.worker_id = worker_id
        self.retry_s = 10.0  # how often a routing that does not load is loaded again
        declared = {m.name: topology.versions_of(m.name) for m in topology.models}
        serving = {m.name: m.serving for m in topology.models}
        self.table = RoutingTable.initial(
            declared,
            serving,
            time.time(),
        )
        key = topology.control.hmac_key
        self._hmac_key = key.get_secret_value().encode() if key else None
        self._on_reset = on_reset
        self._on_served = on_served
        self._rollout_driver = rollout_driver  # the driver's live view, when this worker drives
        self._resets_skipped = 0  # resets the replay skipped (a restored snapshot follows them)

    def load(self) -> str | None:
        """Load what the table routes and serve it; else say why (loader thread)."""
        return self.models.serve(self.table)

    def rebuild(self, replayed: Sequence[Message]) -> None:
        """The routing table planned over the whole log, then only what it ends with loaded.

        Never raises because of one command: a command is applied or rejected by the table
        (which depends on the log alone), and a routing that does not load leaves this worker
        serving nothing, not ready, until it does (:meth:`load`, retried). Logs one line: how
        many commands were applied and rejected (by reason) and the routing the log ends with;
        each command's own line is DEBUG, since the log is replayed at every start.
        """
        # Online learners are always loaded (they learn whether they serve or not), before the
        # replay: the resets it goes through apply to them.
        self.models.load(self.models.learner_keys)
        started = time.monotonic()
        skipped_before = self._resets_skipped
        applied = 0
        rejected: Counter[str] = Counter()
        for msg in replayed:
            _cmd, error = self.apply(
                msg.value(), replay=True, offset=msg.offset(), record_ts=record_time_s(msg)
            )
            if error is None or error.reason == control.NOT_A_LEARNER:  # in the table all the same
                applied += 1
            else:
                rejected[error.reason] += 1
        replay_s = time.monotonic() - started
        problem = self.load()
        skipped = self._resets_skipped - skipped_before
        log.info(
            "replayed %d control commands%s in %.1f s: %d applied, %d rejected%s%s; routing %s%s",
            len(replayed),
            f" up to offset {replayed[-1].offset()}" if replayed else "",
            replay_s,
            applied,
            rejected.total(),
            _by_reason(rejected),
            f" ({skipped} learner resets skipped: the restored snapshots follow them)"
            if skipped
            else "",
            self.table.as_dict()["routes"],
            f"; NOT serving it: {problem}" if problem else "",
        )

    def apply(
        self,
        raw: bytes | None,
        *,
        replay: bool = False,
        offset: int | None = None,
        record_ts: float | None = None,
    ) -> tuple[Command | None, ControlError | None]:
        """Parse, validate and apply to the routing table, then (live) load what it routes and
        switch. Runs on the loader thread.

        Applied or rejected is decided by the table, from the log alone (``record_ts``: the
        record's Kafka timestamp, for ``issued_at``): the same on every worker. A rejected
        command leaves the routing untouched. A routing that does not load is not a rejection:
        ``models.problem`` says why, and the last routing that loaded keeps serving. During the
        replay nothing is loaded; :meth:`rebuild` loads what the whole log ends with.

        A live command is counted (``stream_infer_control_commands_total``) and logged: INFO
        when applied, WARNING when rejected. A replayed one is neither counted nor logged above
        DEBUG (every start replays the whole log): :meth:`rebuild` sums the replay up.
        """
        cmd: Command | None = None
        try:
            cmd = parse_command(
                raw,
                hmac_key=self._hmac_key,
                max_age_s=self.topology.control.max_command_age_s,
                record_ts=record_ts,
            )
            changed = self.table.apply(cmd, time.time())
            if cmd.command == "reset_learner":  # applied by every table; a learner here?
                self.reset_learner(cmd, offset)
            elif not replay and (changed or self.models.problem is not None):
                self.load()
        except ControlError as exc:
            if replay:  # the replay's summary line counts it (rebuild)
                log.debug("control command %s rejected (replay): %s", exc.command_id, exc)
                return cmd, exc
            if exc.reason == control.NOT_A_LEARNER and cmd is not None:
                # Applied by the routing table (as on every worker); only this worker has no
                # such learner to reset, which its ack says.
                self.metrics.control_commands.labels(cmd.command, "applied").inc()
                log.info("control command %s applied; on this worker: %s", cmd.id, exc)
                return cmd, exc
            self.metrics.control_commands.labels(cmd.command if cmd else "?", "rejected").inc()
            log.warning("control command %s rejected: %s", exc.command_id, exc)
            return cmd, exc
        routes = self.table.as_dict()["routes"]
        if replay:
            log.debug("control command %s (%s) applied (replay): %s", cmd.id, cmd.command, routes)
            return cmd, None
        self.metrics.control_commands.labels(cmd.command, "applied").inc()
        log.info("control command %s (%s) applied: %s", cmd.id, cmd.command, routes)
        return cmd, None

    def reset_learner(self, cmd: Command, offset: int | None = None) -> None:
        """Reset a learner, unless its state already follows this command: a learner restored
        from a snapshot records the control-log offset of the last reset it went through, and
        the replay at start skips the resets at or below it (so a restart restores exactly
        what was learned). ``offset``: the command's control-log offset (None: not known)."""
        learner = self.models.predictors.get(ModelVersion(cmd.model or "", cmd.version or ""))
        if not isinstance(learner, OnlineLearner):
            msg = f"{cmd.model}:{cmd.version} is not an online learner"
            raise ControlError(control.NOT_A_LEARNER, msg, command_id=cmd.id)
        if offset is not None and offset <= learner.control_offset:
            self._resets_skipped += 1
            log.debug(
                "reset of %s:%s at control offset %d skipped: its snapshot already follows "
                "the reset at offset %d",
                cmd.model,
                cmd.version,
                offset,
                learner.control_offset,
            )
            return
        learner.reset(offset)
        self._on_reset(learner.model)  # its error starts afresh: so do the model's monitors

    async def handle(
        self, raw: bytes | None, offset: int | None = None, timestamp_s: float | None = None
    ) -> None:
        """Apply one live command (``offset``: its control-log offset, ``timestamp_s``: its
        record's timestamp) off the serving path, then acknowledge it on the acks topic."""
        apply = functools.partial(self.apply, raw, offset=offset, record_ts=timestamp_s)
        cmd, error = await self.threads.on_loader(apply)
        self._on_served()
        if error is None:
            # A batch that read the old snapshot may still be on the inference thread. That
            # thread runs batches in order, so once a no-op has run there, every batch served
            # by the old routing is done: what the ack promises is then true of everything after.
            await self.threads.inference_barrier()
        acks = self.topology.topics.acks
        if acks is None or self.kafka.publisher is None:
            return
        value = encode_ack(
            command_id=cmd.id if cmd else getattr(error, "command_id", None),
            command=cmd.command if cmd else None,
            worker=self.worker_id,
            table=self.table,
            error=error,
            now=time.time(),
            not_loaded=self.models.problem if error is None else None,
            serving=self.models.snapshot.routes,
            rollout_driver=self._rollout_driver(),
        )
        # Not awaited: an ack gates no offset (the control log is replayed, not committed), and
        # waiting on it would hold every later command (a rollback) while the acks topic
        # refuses Write. It is still delivered with retries, in order. Published on the loader
        # thread (one thread: acks keep their order), not on the event loop.
        ack = [OutRecord(acks, self.worker_id.encode(), value)]
        if not self.threads.later_on_loader(functools.partial(self.kafka.publish_untracked, ack)):
            log.warning("ack of %s not sent: the worker is stopping", cmd.id if cmd else None)

    async def retry_loads(self) -> None:
        """Forever: every ``retry_s``, while the log's routing is not served, load it again (on
        the loader thread, in order with the commands)."""
        while True:
            await asyncio.sleep(self.retry_s)
            if self.models.problem is not None:
                await self.threads.on_loader(self.load)
                self._on_served()


def record_time_s(msg: Message) -> float | None:
    """When the broker wrote the record, in seconds: None unless its timestamp is the broker's
    (LogAppendTime; with CreateTime the sender chooses it, so it proves nothing)."""
    kind, ms = msg.timestamp()
    return ms / 1000.0 if kind == TIMESTAMP_LOG_APPEND_TIME else None


def _by_reason(rejected: Counter[str]) -> str:
    """`` (2 duplicate_command, 1 unknown_version)``: the most frequent reason first; "" for
    none."""
    if not rejected:
        return ""
    ranked = sorted(rejected.items(), key=lambda item: (-item[1], item[0]))
    return " (" + ", ".join(f"{n} {reason}" for reason, n in ranked) + ")"
