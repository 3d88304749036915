"""The model versions loaded on this worker, the routing snapshot they serve, and the watchdog
that bounds their calls.

:meth:`Models.serve` loads and warms up what a routing table routes, then swaps the snapshot
the next batch is served by (:class:`~stream_infer.core.pipeline.RoutingSnapshot`) and unloads
what nothing needs any more. A routing that does not load is not served: the last one that
loaded goes on serving and :attr:`Models.problem` says why (readiness, acks, the retry).
Online learners are always loaded: they learn whether they serve or not. Here they are
predictors like the others, made by ``make_learner``; what only a learner does (a reset) is
the control plane's.

The metrics of what happens here are set here: the routes served (each swap) and the model
calls the watchdog reports hung or timed out.

Loads run on one thread at a time (the loader thread; the inference thread at start), never
on the event loop and never beside a batch on the inference thread. ``Models.predictors`` is
copied on write: every change replaces the dict with a new one, so a reader on another thread
(the learning thread reads the learners, the event loop a learner to reset) iterates a dict
that no thread changes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import torch

from stream_infer.core.control import RoutingTable, required_versions
from stream_infer.core.events import ModelVersion
from stream_infer.core.pipeline import Predictor, RoutingSnapshot
from stream_infer.core.watchdog import Watchdog
from stream_infer.errors import ModelError
from stream_infer.inference.device import select_device
from stream_infer.inference.predictor import TorchPredictor
from stream_infer.observability import Metrics
from stream_infer.runtime.threads import torch_threads
from stream_infer.settings import LearnerSettings, Topology

log = logging.getLogger(__name__)


class Models:
    """The predictors loaded here (``predictors``), the snapshot that serves (``snapshot``)
    and the watchdog over the model calls (``watchdog``).

    ``make_learner``: a River learner for a declared one (restored from its snapshot when one
    fits); None when online learning is off. ``on_switch``: called after a swap that changed
    some models' routes, with those models.
    """

    def __init__(
        self,
        topology: Topology,
        metrics: Metrics,
        *,
        make_learner: Callable[[LearnerSettings], Predictor] | None = None,
        on_switch: Callable[[set[str]], None] = lambda _changed: None,
    ) -> None:
        self.topology = topology
        self.metrics = metrics
        self.device = select_device(topology.device)
        self.watchdog = Watchdog(
            topology.limits.inference_timeout_s,
            max_hung=topology.limits.max_hung_calls,
            on_hung=self._calls_hung,
            initializer=torch_threads(topology.worker.inference_threads),
        )
        # Replaced whole on every change, never changed in place (copy-on-write).
        self.predictors: Mapping[ModelVersion, Predictor] = {}
        self.snapshot = RoutingSnapshot(routes={}, predictors={})
        self.learner_keys = frozenset(
            ModelVersion(x.model, x.version) for x in topology.online.learners
        )
        # Why this worker cannot serve the routing the control log names (None: it serves it).
        self.problem: str | None = None
        # The last load failed for lack of memory while earlier versions were resident.
        self.out_of_memory = False
        self._make_learner = make_learner
        self._on_switch = on_switch

    @property
    def serves(self) -> bool:
        """Whether a routing serves here (at start: once the log's routing loaded)."""
        return bool(self.snapshot.routes)

    def serve(self, table: RoutingTable) -> str | None:
        """Load what ``table`` routes and serve it; else say why.

        Any failure to load, move or warm up a version (a missing or corrupt artifact, a torch
        error, out of device memory, an assertion in the model's warm-up) is caught here: the
        worker keeps serving what it served, is not ready, and the reason is returned.
        """
        needed = required_versions(table.routes) | self.learner_keys
        try:
            self.load(needed)
        except Exception as exc:  # the loading boundary: nothing of a load escapes it
            problem = str(exc) if isinstance(exc, ModelError) else f"{type(exc).__name__}: {exc}"
            # Retrying beside the versions that serve now may never fit; a restart would.
            self.out_of_memory = _out_of_memory(exc) and len(self.predictors) > len(
                self.learner_keys
            )
            if problem != self.problem:
                log.error("cannot serve the routing the control log names: %s", problem)
            self.problem = problem
            return problem
        if self.problem is not None:
            log.warning("the routing the control log names loaded: %s", table.routes)
        self.problem = None
        self.out_of_memory = False
        self._install(table)
        return None

    def load(self, needed: set[ModelVersion] | frozenset[ModelVersion]) -> None:
        """Load and warm up every needed version not loaded yet. Raises ModelError, with the
        version and the reason, whatever went wrong."""
        for model, version in sorted(needed - set(self.predictors)):
            try:
                self._load_one(ModelVersion(model, version))
            except Exception as exc:
                msg = (
                    f"{model}:{version} could not be loaded, moved to {self.device} or warmed "
                    f"up: {type(exc).__name__}: {exc}"
                )
                raise ModelError(msg) from exc

    def _load_one(self, key: ModelVersion) -> None:
        model, version = key
        learner = next(
            (x for x in self.topology.online.learners if (x.model, x.version) == key), None
        )
        if learner is not None:
            assert self._make_learner is not None  # declared learners turn online learning on
            self._add(key, self._make_learner(learner))
            return
        settings = self.topology.model(model)
        spec = settings.version(version) if settings else None
        if spec is None:  # the routing table only names declared versions
            raise ModelError(f"{model}:{version} is not declared")
        started = time.perf_counter()
        _meta, predictor = TorchPredictor.load(
            spec.path,
            model=model,
            version=version,
            features=self.topology.features,
            device=self.device,
        )
        predictor.warm_up()
        self._add(key, predictor)
        log.info("loaded %s:%s in %.0f ms", model, version, (time.perf_counter() - started) * 1000)

    def _install(self, table: RoutingTable) -> None:
        """Make the table's routes the serving snapshot (atomic for the next batch)."""
        generation = table.generation  # read first: never newer than the routes it tags
        routes = dict(table.routes)
        needed = required_versions(routes)
        before = self.snapshot.routes
        changed = {m for m, r in routes.items() if before and before.get(m) != r}
        self.snapshot = RoutingSnapshot(
            routes=routes,
            predictors={key: self.predictors[key] for key in needed},
            generation=generation,
        )
        # Unload what neither this routing nor a learner needs (a batch still on the inference
        # thread keeps its own references until it is done).
        keep = needed | self.learner_keys
        if gone := set(self.predictors) - keep:
            self.predictors = {k: p for k, p in self.predictors.items() if k not in gone}
            for key in sorted(gone):
                log.info("unloaded %s:%s", *key)
        self.metrics.set_routes({m: dict(r.weights) for m, r in routes.items()})
        self.metrics.routing_changed.set(table.changed_at)
        if changed:
            self._on_switch(changed)

    def _add(self, key: ModelVersion, predictor: Predictor) -> None:
        self.predictors = {**self.predictors, key: predictor}

    def _calls_hung(self, key: ModelVersion, hung: int, timed_out: bool) -> None:
        """The watchdog's report (any thread): ``key``'s count of hung calls is now ``hung``;
        ``timed_out``: a call just overran (else a hung one returned late)."""
        self.metrics.hung_calls.labels(*key).set(hung)
        if timed_out:
            self.metrics.inference_timeouts.labels(*key).inc()


def _out_of_memory(exc: BaseException) -> bool:
    """Whether a load failed for lack of (device or host) memory, anywhere in its causes."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, MemoryError | torch.OutOfMemoryError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
