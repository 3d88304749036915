"""The per-batch core: decode, route, infer, encode. Pure: numpy, no Kafka, faust or torch.

``Pipeline.process`` turns one micro-batch of records into the records to produce (predictions,
shadow predictions and dead letters) plus counters. It never raises for bad data or a failing
model: those become dead letters with a reason. It is CPU-bound and is meant to run off the
event loop (see runtime/).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from stream_infer.core import serde
from stream_infer.core.events import (
    BatchResult,
    DeadLetter,
    FeatureBatch,
    ModelVersion,
    OutRecord,
    Record,
)
from stream_infer.core.routing import Route
from stream_infer.core.watchdog import Watchdog
from stream_infer.errors import InferenceTimeout, ModelOutputError

log = logging.getLogger(__name__)


class Predictor(Protocol):
    """Anything that scores a float32 matrix (n, features) into n outputs."""

    model: str
    version: str

    def predict_many(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]: ...


@dataclass(frozen=True)
class ModelOutput:
    """Where one model's predictions go."""

    name: str
    topic: str


@dataclass(frozen=True)
class RoutingSnapshot:
    """An immutable snapshot of the routing a worker serves: routes plus the loaded
    predictors they name.

    The runtime swaps the whole snapshot between batches, so a batch is served by one
    consistent routing and never sees a half-applied change.
    """

    routes: Mapping[str, Route]
    predictors: Mapping[ModelVersion, Predictor]
    # The routing table's generation these routes are of: what a rollout counts a step's
    # labels by (the events this snapshot served are the step's when it is >= the step's).
    generation: int = 0


class Pipeline:
    def __init__(
        self,
        decoder: serde.FeatureDecoder,
        outputs: Sequence[ModelOutput],
        *,
        dead_letter_topic: str,
        shadow_topic: str | None,
        clock: Callable[[], float] = time.time,
        track_scores: bool = False,
        watchdog: Watchdog | None = None,
        max_dead_letter_bytes: int = serde.MAX_DEAD_LETTER_BYTES,
    ) -> None:
        self.decoder = decoder
        self.max_dead_letter_bytes = max_dead_letter_bytes
        self.outputs = tuple(outputs)
        self.dead_letter_topic = dead_letter_topic
        self.shadow_topic = shadow_topic
        self.clock = clock
        self.track_scores = track_scores
        self.watchdog = watchdog

    def process(self, records: Sequence[Record], snapshot: RoutingSnapshot) -> BatchResult:
        result = BatchResult(n_in=len(records))
        batch, result.dead_letters = self.decoder.decode_batch(records)
        result.event_ts = [ts for ts in batch.ts if ts is not None]
        if self.track_scores:
            result.batch = batch
        failed: dict[int, DeadLetter] = {}
        if len(batch):
            for out in self.outputs:
                route = snapshot.routes[out.name]
                for version, rows in route.assign(batch.keys):
                    part = batch if rows.size == len(batch) else batch.select(rows)
                    predictor = snapshot.predictors[ModelVersion(out.name, version)]
                    self._serve(
                        records,
                        part,
                        predictor,
                        out.topic,
                        result,
                        failed,
                        result.served,
                        snapshot.generation,
                    )
                if route.shadow is not None and self.shadow_topic is not None:
                    shadow = snapshot.predictors[ModelVersion(out.name, route.shadow)]
                    self._serve(
                        records,
                        batch,
                        shadow,
                        self.shadow_topic,
                        result,
                        None,
                        result.shadowed,
                        snapshot.generation,
                    )
        result.dead_letters.extend(failed.values())
        result.records.extend(self.dead_letter_records(result.dead_letters))
        return result

    def dead_letter_records(self, letters: Sequence[DeadLetter]) -> list[OutRecord]:
        """The dead-letter topic's records for these letters (keyed like their records)."""
        now = self.clock()
        topic, cap = self.dead_letter_topic, self.max_dead_letter_bytes
        return [
            OutRecord(
                topic,
                letter.record.key(),
                serde.encode_dead_letter(letter, now=now, max_bytes=cap),
            )
            for letter in letters
        ]

    def _serve(
        self,
        records: Sequence[Record],
        batch: FeatureBatch,
        predictor: Predictor,
        topic: str,
        result: BatchResult,
        failed: dict[int, DeadLetter] | None,
        counts: dict[ModelVersion, int],
        generation: int = 0,
    ) -> None:
        started = time.perf_counter()
        values, errors = predict_isolating(predictor, batch.x, self.watchdog)
        result.inference_s += time.perf_counter() - started
        ok = np.ones(len(batch), dtype=bool)
        for row, (reason, detail) in errors.items():
            ok[row] = False
            if failed is not None:
                pos = batch.positions[row]
                if pos not in failed:  # the first model to fail an event names the reason
                    failed[pos] = DeadLetter(reason, detail, records[pos])
        good = batch if ok.all() else batch.select(np.flatnonzero(ok))
        good_values = values if ok.all() else values[ok]
        payloads = serde.encode_predictions(
            good,
            good_values.tolist(),
            model=predictor.model,
            version=predictor.version,
            served_at=self.clock(),
        )
        result.records.extend(
            OutRecord(topic, key, value, records[pos])
            for key, value, pos in zip(good.keys, payloads, good.positions, strict=True)
        )
        if self.track_scores and len(batch):
            # Every row the version was asked to score, a failed one (raised, timed out,
            # non-finite) as NaN: a rollout counts its failures against it, never leaves them out.
            scored = values if ok.all() else np.where(_rows(ok, values), values, np.nan)
            model, version = predictor.model, predictor.version
            result.scored.append((model, version, batch.ids, scored, generation))
        if len(good):
            key = ModelVersion(predictor.model, predictor.version)
            counts[key] = counts.get(key, 0) + len(good)


def predict_isolating(
    predictor: Predictor, x: npt.NDArray[np.float32], watchdog: Watchdog | None = None
) -> tuple[npt.NDArray[np.float64], dict[int, tuple[str, str]]]:
    """Predict a batch; if the model fails, find the rows that make it fail.

    Returns the values (rows that failed hold NaN) and ``{row: (reason, detail)}`` for every row
    that could not be served: the model raised on it, returned the wrong shape or a non-finite
    value (rows found by bisection), or did not answer within the watchdog's limit.

    A call that times out is retried one event at a time, so each event that hangs costs one
    timeout (bisection would cost one per level). Once the watchdog refuses a version (too many
    of its calls still hung), its remaining rows fail at once.
    """
    errors: dict[int, tuple[str, str]] = {}
    n = x.shape[0]
    try:
        values = _predict(predictor, x, watchdog)
    except InferenceTimeout as exc:
        if n == 1 or exc.refused:
            detail = f"{type(exc).__name__}: {exc}"[:500]
            return np.full(n, np.nan), dict.fromkeys(range(n), (serde.MODEL_TIMEOUT, detail))
        return _combine([predict_isolating(predictor, x[i : i + 1], watchdog) for i in range(n)])
    except Exception as exc:  # a model may raise anything; the events are what we must keep
        if n == 1:
            output_error = isinstance(exc, ModelOutputError)
            reason = serde.MODEL_OUTPUT_INVALID if output_error else serde.MODEL_FAILED
            errors[0] = (reason, f"{type(exc).__name__}: {exc}"[:500])
            return np.full(1, np.nan), errors
        mid = n // 2
        return _combine(
            [
                predict_isolating(predictor, x[:mid], watchdog),
                predict_isolating(predictor, x[mid:], watchdog),
            ]
        )
    finite = np.isfinite(values) if values.ndim == 1 else np.isfinite(values).all(axis=1)
    if not finite.all():
        for row in np.flatnonzero(~finite).tolist():
            errors[row] = (serde.MODEL_OUTPUT_INVALID, "the model returned a non-finite value")
    return values, errors


def _predict(
    predictor: Predictor, x: npt.NDArray[np.float32], watchdog: Watchdog | None
) -> npt.NDArray[np.float64]:
    """One model call (bounded by the watchdog when there is one), its output shape checked."""
    n = x.shape[0]
    if watchdog is None:
        values = predictor.predict_many(x)
    else:
        values = watchdog.call(
            ModelVersion(predictor.model, predictor.version), lambda: predictor.predict_many(x)
        )
    if values.ndim not in (1, 2) or values.shape[0] != n:
        msg = f"returned shape {values.shape} for a batch of {n}; expected ({n},...)"
        raise ModelOutputError(msg, model=predictor.model, version=predictor.version)
    return values


def _combine(
    parts: list[tuple[npt.NDArray[np.float64], dict[int, tuple[str, str]]]],
) -> tuple[npt.NDArray[np.float64], dict[int, tuple[str, str]]]:
    """Concatenate the results of consecutive slices of one batch, renumbering their errors."""
    arrays = [values for values, _ in parts]
    if len({(a.ndim, a.shape[1:]) for a in arrays}) > 1:  # a failed slice holds a NaN column
        arrays = [_as_column(a) for a in arrays]
    errors: dict[int, tuple[str, str]] = {}
    start = 0
    for values, part_errors in parts:
        errors.update({row + start: err for row, err in part_errors.items()})
        start += values.shape[0]
    return np.concatenate(arrays), errors


def _rows(ok: npt.NDArray[np.bool_], values: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    """``ok`` (one flag per row) shaped to broadcast over ``values`` (1-D or one row per event)."""
    return ok if values.ndim == 1 else ok.reshape(-1, *([1] * (values.ndim - 1)))


def _as_column(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return values.reshape(values.shape[0], -1)[:, :1]
