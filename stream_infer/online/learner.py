"""A river classifier behind the Predictor protocol: it serves, and it learns from labels.

:class:`OnlineLearner` scores batches like any other version (``predict_many``) while the
runtime feeds it labelled events one at a time (``learn_one``, in the order they were joined).
Learning is river's ``learn_one``, so a learner fed the same rows in the same order holds the
same model as river's own one-at-a-time loop: predictions are identical, bit for bit.

Kinds (``LEARNER_KINDS``, defined in :mod:`stream_infer.online`):

* ``logistic_regression``: ``StandardScaler() | LogisticRegression()`` with river's defaults, or
  ``LogisticRegression()`` alone when ``scale`` is False;
* ``hoeffding_tree``: ``HoeffdingTreeClassifier()``;
* ``arf``: ``ARFClassifier(seed=seed)``.

``scale`` applies to logistic regression only; the trees are used as river builds them.

Thread-safety: inference and learning run on different threads, so every call that reads or
changes the river model holds one lock (``predict_many`` for its whole batch).
"""

from __future__ import annotations

import hashlib
import math
import pickle
import struct
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from river import compose, forest, linear_model, preprocessing, tree

from stream_infer.errors import ModelError
from stream_infer.online import LEARNER_KINDS, LearnerKind

if TYPE_CHECKING:
    from stream_infer.core.pipeline import Predictor

# Snapshot format: MAGIC, format version (u16), sha256 of the payload, payload length (u64),
# then the payload (a pickle of the learner's state).
SNAPSHOT_MAGIC = b"SIOLSNAP"
SNAPSHOT_FORMAT = 1
_HEADER = struct.Struct(">8sH32sQ")


def _build(kind: LearnerKind, scale: bool, seed: int) -> Any:
    if kind == "logistic_regression":
        model = linear_model.LogisticRegression()
        return compose.Pipeline(preprocessing.StandardScaler(), model) if scale else model
    if kind == "hoeffding_tree":
        return tree.HoeffdingTreeClassifier()
    return forest.ARFClassifier(seed=seed)


def _p_true(proba: Mapping[Any, float]) -> float:
    # A model that has learned nothing returns {} (trees) or {False: .5, True: .5} (logistic).
    if not proba:
        return 0.5
    return float(proba.get(True, 0.0))


class OnlineLearner:
    """A river binary classifier that serves P(label = 1) and learns one labelled row at a time.

    Parameters
    ----------
    model, version
        What this learner serves as (the Predictor protocol's attributes).
    features
        The feature names, in the column order of the arrays given to ``predict_many``.
    kind
        One of ``LEARNER_KINDS``.
    scale
        Standardise the features before logistic regression (ignored by the trees).
    seed
        The random seed of ``arf`` (ignored by the other kinds).
    """

    def __init__(
        self,
        model: str,
        version: str,
        features: Sequence[str],
        kind: LearnerKind = "logistic_regression",
        scale: bool = True,
        seed: int = 0,
    ) -> None:
        for name, value in (("model", model), ("version", version)):
            if not isinstance(value, str) or not value:
                msg = f"OnlineLearner: {name} must be a non-empty string, got {value!r}"
                raise ValueError(msg)
        names = tuple(features)
        if not names or not all(isinstance(f, str) and f for f in names):
            msg = f"OnlineLearner: features must be non-empty strings, at least one; got {names!r}"
            raise ValueError(msg)
        if len(set(names)) != len(names):
            msg = f"OnlineLearner: feature names must be unique, got {names!r}"
            raise ValueError(msg)
        if kind not in LEARNER_KINDS:
            msg = f"OnlineLearner: kind must be one of {', '.join(LEARNER_KINDS)}; got {kind!r}"
            raise ValueError(msg)
        if not isinstance(scale, bool):
            msg = f"OnlineLearner: scale must be a bool, got {scale!r}"
            raise ValueError(msg)
        if isinstance(seed, bool) or not isinstance(seed, int):
            msg = f"OnlineLearner: seed must be an int, got {seed!r}"
            raise ValueError(msg)
        self.model = model
        self.version = version
        self.features = names
        self.kind = kind
        self.scale = scale
        self.seed = seed
        self._lock = threading.Lock()
        self._river = _build(kind, scale, seed)
        self._n_learned = 0
        self._control_offset = -1

    def __repr__(self) -> str:
        return (
            f"OnlineLearner(model={self.model!r}, version={self.version!r}, kind={self.kind!r}, "
            f"n_learned={self._n_learned})"
        )

    @property
    def n_learned(self) -> int:
        """How many labelled rows the current model has learned (0 after :meth:`reset`)."""
        return self._n_learned

    @property
    def control_offset(self) -> int:
        """The control-log offset of the last ``reset_learner`` applied to this learner (-1:
        none). Kept in the snapshot: a replay of the control log skips the resets at or below
        it, since the restored state already follows them."""
        return self._control_offset

    # -- batches (the Predictor protocol) ------------------------------------------------------

    def _rows(self, x: npt.NDArray[Any], where: str) -> list[dict[str, float]]:
        if x.ndim != 2 or x.shape[1] != len(self.features):
            msg = (
                f"OnlineLearner.{where} ({self.model}/{self.version}): expected shape "
                f"(n, {len(self.features)}), got {tuple(x.shape)}"
            )
            raise ValueError(msg)
        if not np.isfinite(x).all():
            bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
            msg = f"OnlineLearner.{where} ({self.model}/{self.version}): row {bad} is not finite"
            raise ValueError(msg)
        names = self.features
        return [dict(zip(names, row, strict=True)) for row in x.tolist()]

    def predict_many(self, x: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
        """P(label = 1) for each row of ``x`` (shape (n, features)): float64, shape (n,).

        A learner that has learned nothing returns 0.5 for every row.
        """
        rows = self._rows(x, "predict_many")
        out = np.empty(len(rows), dtype=np.float64)
        with self._lock:
            predict = self._river.predict_proba_one
            for i, row in enumerate(rows):
                out[i] = _p_true(predict(row))
        return out

    # -- one at a time ------------------------------------------------------------------------

    def predict_proba_one(self, x: Mapping[str, float]) -> float:
        """P(label = 1) for one event given as ``{feature: value}``."""
        row = dict(x)
        with self._lock:
            return _p_true(self._river.predict_proba_one(row))

    def learn_one(self, x: Mapping[str, float], y: bool) -> None:
        """Learn one event given as ``{feature: value}`` with its label (bool or 0/1)."""
        target = self._target(y, "learn_one")
        row = dict(x)
        with self._lock:
            self._river.learn_one(row, target)
            self._n_learned += 1

    def _target(self, y: object, where: str) -> bool:
        try:
            value = float(y)  # type: ignore[arg-type]  # bool, int, float and numpy scalars
        except (TypeError, ValueError):
            value = math.nan
        if value not in (0.0, 1.0):
            msg = f"OnlineLearner.{where} ({self.model}/{self.version}): a label is 0/1, got {y!r}"
            raise ValueError(msg)
        return value == 1.0

    def reset(self, control_offset: int | None = None) -> None:
        """Forget everything learned: a fresh river model with the same parameters.

        ``control_offset``: the control-log offset of the ``reset_learner`` command that asked
        for it, recorded (with the state, atomically) as :attr:`control_offset`.
        """
        with self._lock:
            self._river = _build(self.kind, self.scale, self.seed)
            self._n_learned = 0
            if control_offset is not None:
                self._control_offset = max(self._control_offset, control_offset)

    # -- snapshots ----------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The learner's state as bytes for :meth:`restore`.

        The payload is a pickle. That is acceptable only because a worker writes snapshots to its
        own state directory and reads back only those: never restore bytes from anywhere else,
        since unpickling can run arbitrary code. The header's sha256 catches truncation and
        corruption (a partial write, a bad disk), not tampering: whoever can write the file can
        write a matching digest.
        """
        with self._lock:
            state = {
                "model": self.model,
                "version": self.version,
                "features": self.features,
                "kind": self.kind,
                "scale": self.scale,
                "seed": self.seed,
                "n_learned": self._n_learned,
                "control_offset": self._control_offset,
                "river": self._river,
            }
            payload = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
        digest = hashlib.sha256(payload).digest()
        return _HEADER.pack(SNAPSHOT_MAGIC, SNAPSHOT_FORMAT, digest, len(payload)) + payload

    @classmethod
    def restore(
        cls, data: bytes, *, model: str | None = None, version: str | None = None
    ) -> OnlineLearner:
        """A learner from :meth:`snapshot`'s bytes (only bytes this worker wrote; see there).

        ``model`` / ``version``, when given, must match the snapshot's. Raises
        :class:`~stream_infer.errors.ModelError` for bytes that are not a whole, intact snapshot
        of this format, before anything is unpickled.
        """
        view = memoryview(data)
        if len(view) < _HEADER.size:
            msg = f"snapshot is {len(view)} bytes, shorter than its {_HEADER.size}-byte header"
            raise ModelError(msg, model=model, version=version)
        magic, fmt, digest, length = _HEADER.unpack_from(view)
        if magic != SNAPSHOT_MAGIC:
            msg = f"not an online-learner snapshot (header {bytes(magic)!r})"
            raise ModelError(msg, model=model, version=version)
        if fmt != SNAPSHOT_FORMAT:
            msg = f"snapshot format {fmt} is not supported (this build reads {SNAPSHOT_FORMAT})"
            raise ModelError(msg, model=model, version=version)
        payload = view[_HEADER.size :]
        if len(payload) != length:
            msg = f"snapshot payload is {len(payload)} bytes, its header says {length}: truncated"
            raise ModelError(msg, model=model, version=version)
        if hashlib.sha256(payload).digest() != digest:
            msg = "snapshot payload does not match its sha256: corrupt"
            raise ModelError(msg, model=model, version=version)
        try:
            state = pickle.loads(payload)  # noqa: S301 - our own, digest-checked snapshot
            learner = cls(
                state["model"],
                state["version"],
                state["features"],
                kind=state["kind"],
                scale=state["scale"],
                seed=state["seed"],
            )
            n_learned = int(state["n_learned"])
            control_offset = int(state.get("control_offset", -1))  # absent before 2026-12
            river_model = state["river"]
        except Exception as exc:  # any failure to rebuild means the snapshot is unusable
            msg = f"snapshot cannot be read: {type(exc).__name__}: {exc}"
            raise ModelError(msg, model=model, version=version) from exc
        for name, expected, found in (
            ("model", model, learner.model),
            ("version", version, learner.version),
        ):
            if expected is not None and expected != found:
                msg = f"snapshot is of {name} {found!r}, expected {expected!r}"
                raise ModelError(msg, model=model, version=version)
        learner._river = river_model
        learner._n_learned = n_learned
        learner._control_offset = control_offset
        return learner


if TYPE_CHECKING:

    def _is_a_predictor(learner: OnlineLearner) -> Predictor:
        return learner
