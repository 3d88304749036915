"""Bytes to events and back, one micro-batch at a time.

Decoding splits a batch into good events (one float32 matrix) and dead letters (the raw record
plus a reason). It never raises for bad input: a bad record is data. The reasons are short
codes, documented in schemas/dead-letter.schema.json. Records of the labels topic are decoded
here too (:func:`decode_labels`): ``(event id, label)`` pairs, or ``invalid_label`` dead letters.

>>> decoder = FeatureDecoder(["amount", "age"], max_event_bytes=1024)
>>> decoder.decode_one(b'{"id": "e-1", "features": {"age": 41, "amount": 12.5}}')
('e-1', [12.5, 41], None)
>>> decode_label(b'{"id": "e-1", "label": true}')
('e-1', 1.0)
"""

from __future__ import annotations

import base64
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

from stream_infer.core.events import SCHEMA_VERSION, DeadLetter, FeatureBatch, Record
from stream_infer.errors import InvalidEvent

_NUMBER = (int, float)
_NUMBER_TYPES = frozenset(_NUMBER)
MAX_ID_CHARS = 512

# Dead-letter reasons.
OVERSIZED = "oversized"
EMPTY = "empty"
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
SCHEMA_MISMATCH = "unsupported_schema_version"
INVALID_ID = "invalid_id"
INVALID_TS = "invalid_ts"
MISSING_FEATURES = "missing_features"
MISSING_FEATURE = "missing_feature"
UNEXPECTED_FEATURE = "unexpected_feature"
WRONG_FEATURE_COUNT = "wrong_feature_count"
INVALID_FEATURE_TYPE = "invalid_feature_type"
NON_FINITE_FEATURE = "non_finite_feature"
MODEL_FAILED = "model_failed"
MODEL_OUTPUT_INVALID = "model_output_invalid"
MODEL_TIMEOUT = "model_timeout"
# A record the worker produced (a prediction, a drift event) that its topic refuses for good.
UNDELIVERABLE = "undeliverable"
# A record of the labels topic that is not a label.
INVALID_LABEL = "invalid_label"
REASONS = (
    OVERSIZED,
    EMPTY,
    INVALID_JSON,
    NOT_AN_OBJECT,
    SCHEMA_MISMATCH,
    INVALID_ID,
    INVALID_TS,
    MISSING_FEATURES,
    MISSING_FEATURE,
    UNEXPECTED_FEATURE,
    WRONG_FEATURE_COUNT,
    INVALID_FEATURE_TYPE,
    NON_FINITE_FEATURE,
    MODEL_FAILED,
    MODEL_OUTPUT_INVALID,
    MODEL_TIMEOUT,
    UNDELIVERABLE,
    INVALID_LABEL,
)


class FeatureDecoder:
    """Decodes and validates feature events against a fixed feature order."""

    def __init__(self, features: Sequence[str], max_event_bytes: int) -> None:
        if not features:
            msg = "a decoder needs at least one feature name"
            raise ValueError(msg)
        self.features = tuple(features)
        self.max_event_bytes = max_event_bytes
        self._feature_set = frozenset(self.features)

    def decode_one(self, raw: bytes | None) -> tuple[str, list[float], float | None]:
        """Decode one payload into (id, feature row, ts); raise InvalidEvent if it is bad."""
        if raw is None or not raw:
            raise InvalidEvent(EMPTY, "the record has no value")
        if len(raw) > self.max_event_bytes:
            msg = f"{len(raw)} bytes, the limit is {self.max_event_bytes}"
            raise InvalidEvent(OVERSIZED, msg)
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidEvent(INVALID_JSON, str(exc)) from None
        if type(obj) is not dict:
            raise InvalidEvent(NOT_AN_OBJECT, f"expected a JSON object, got {type(obj).__name__}")
        version = obj.get("v", SCHEMA_VERSION)
        if version != SCHEMA_VERSION or type(version) is not int:
            msg = f"schema version {version!r}, this worker reads {SCHEMA_VERSION}"
            raise InvalidEvent(SCHEMA_MISMATCH, msg)
        event_id = obj.get("id")
        if type(event_id) is not str or not event_id or len(event_id) > MAX_ID_CHARS:
            msg = f"'id' must be a non-empty string of at most {MAX_ID_CHARS} characters"
            raise InvalidEvent(INVALID_ID, msg)
        ts = obj.get("ts")
        if ts is not None and (type(ts) not in _NUMBER or not math.isfinite(ts)):
            raise InvalidEvent(INVALID_TS, f"'ts' must be a number (epoch seconds), got {ts!r}")
        return event_id, self._row(obj.get("features")), ts

    def _row(self, feats: Any) -> list[float]:
        if type(feats) is dict:
            if len(feats) != len(self.features) or feats.keys() != self._feature_set:
                missing = [n for n in self.features if n not in feats]
                extra = sorted(set(feats) - self._feature_set)
                if missing:  # a typo'd name is both: name the one that arrived too
                    also = f", unexpected {extra[:10]}" if extra else ""
                    raise InvalidEvent(MISSING_FEATURE, f"missing {missing[:10]}{also}")
                raise InvalidEvent(UNEXPECTED_FEATURE, f"unexpected {extra[:10]}")
            row = list(map(feats.__getitem__, self.features))
        elif type(feats) is list:
            if len(feats) != len(self.features):
                msg = f"got {len(feats)} features, expected {len(self.features)}"
                raise InvalidEvent(WRONG_FEATURE_COUNT, msg)
            row = feats
        elif feats is None:
            raise InvalidEvent(MISSING_FEATURES, "'features' is missing")
        else:
            msg = f"'features' must be an object or an array, got {type(feats).__name__}"
            raise InvalidEvent(INVALID_FEATURE_TYPE, msg)
        if not _NUMBER_TYPES.issuperset(map(type, row)):  # one C-level pass over the row
            bad = next(v for v in row if type(v) not in _NUMBER)
            msg = f"feature values must be numbers, got {type(bad).__name__}"
            raise InvalidEvent(INVALID_FEATURE_TYPE, msg)
        return row

    def decode_batch(self, records: Sequence[Record]) -> tuple[FeatureBatch, list[DeadLetter]]:
        """Split a batch into good events and dead letters. Never raises for bad input."""
        ids: list[str] = []
        keys: list[bytes] = []
        ts: list[float | None] = []
        positions: list[int] = []
        rows: list[list[float]] = []
        dead: list[DeadLetter] = []
        decode_one = self.decode_one
        for pos, record in enumerate(records):
            try:
                event_id, row, event_ts = decode_one(record.value())
            except InvalidEvent as exc:
                dead.append(DeadLetter(exc.reason, exc.detail, record))
                continue
            ids.append(event_id)
            keys.append(record.key() or event_id.encode())
            ts.append(event_ts)
            positions.append(pos)
            rows.append(row)
        with np.errstate(over="ignore"):
            x = np.array(rows, dtype=np.float32).reshape(len(rows), len(self.features))
        finite = np.isfinite(x).all(axis=1)
        batch = FeatureBatch(ids, keys, ts, positions, x)
        if not finite.all():
            for i in np.flatnonzero(~finite).tolist():
                record = records[positions[i]]
                detail = "a feature is outside the float32 range"
                dead.append(DeadLetter(NON_FINITE_FEATURE, detail, record))
            batch = batch.select(np.flatnonzero(finite))
        return batch, dead


def decode_label(raw: bytes | None) -> tuple[str, float]:
    """``{"id": str, "label": number | bool}`` -> (id, label); raise InvalidEvent
    (``invalid_label``) if it is not one.

    >>> decode_label(b'{"id": "e-7", "label": 0}')
    ('e-7', 0.0)
    >>> decode_label(b'{"label": 1}')
    Traceback (most recent call last):
    ...
    stream_infer.errors.InvalidEvent: invalid_label: 'id' must be a non-empty string
    """
    try:
        doc = orjson.loads(raw or b"")
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent(INVALID_LABEL, f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidEvent(INVALID_LABEL, "a label is a JSON object")
    event_id, label = doc.get("id"), doc.get("label")
    if not isinstance(event_id, str) or not event_id:
        raise InvalidEvent(INVALID_LABEL, "'id' must be a non-empty string")
    if not isinstance(label, (bool, int, float)) or not math.isfinite(label):
        msg = f"'label' must be a number or a boolean, got {label!r}"
        raise InvalidEvent(INVALID_LABEL, msg)
    return event_id, float(label)


def decode_labels(records: Sequence[Record]) -> tuple[list[tuple[str, float]], list[DeadLetter]]:
    """Split a batch of label records into labels ``(event id, label)`` and dead letters
    (``invalid_label``, with the reason). Never raises for bad input."""
    decoded: list[tuple[str, float]] = []
    dead: list[DeadLetter] = []
    for record in records:
        try:
            decoded.append(decode_label(record.value()))
        except InvalidEvent as exc:
            dead.append(DeadLetter(exc.reason, exc.detail, record))
    return decoded, dead


# What a dead letter's key and value may take, unless the topology says otherwise
# (limits.max_dead_letter_bytes): under librdkafka's message.max.bytes (1,000,000) and
# Apache Kafka's max.message.bytes (1,048,588) with room to spare, and enough for a whole
# 64 KiB event even if every byte of it is escaped (\u00XX, 6 bytes).
MAX_DEAD_LETTER_BYTES = 512 * 1024
# The most of an `oversized` record's value a dead letter keeps.
OVERSIZED_PREFIX_BYTES = 4096
# The most of a key (characters) and of a detail that the document repeats.
MAX_KEY_CHARS = 1024
MAX_DETAIL_CHARS = 2048
# What a dead letter's value gets at least, whatever the length of its Kafka key.
MIN_DEAD_LETTER_VALUE_BYTES = 8 * 1024


def encode_dead_letter(
    letter: DeadLetter, *, now: float | None = None, max_bytes: int = MAX_DEAD_LETTER_BYTES
) -> bytes:
    """The dead-letter JSON: reason, detail, the original payload, and where it came from.

    The record (its Kafka key, the original key, plus this value) takes at most ``max_bytes``:
    the payload is kept whole when that fits, else its longest prefix that does, with
    ``raw_truncated: true`` (escaping can make JSON text six times its bytes, and base64 adds
    a third, so a record within limits.max_event_bytes may not fit whole). An ``oversized``
    record keeps at most its first 4096 bytes. Only a Kafka key longer than
    ``max_bytes - 8 KiB`` makes the record larger (the key is kept: it places the record).
    """
    record = letter.record
    raw = record.value() or b""
    key = record.key()
    doc: dict[str, Any] = {
        "error": letter.reason,
        "detail": letter.detail[:MAX_DETAIL_CHARS],
        "topic": record.topic(),
        "partition": record.partition(),
        "offset": record.offset(),
        "ts": time.time() if now is None else now,
        "raw_bytes": len(raw),
    }
    if key is not None:
        text = key.decode("utf-8", "backslashreplace")
        doc["key"] = text[:MAX_KEY_CHARS]
        if len(text) > MAX_KEY_CHARS:
            doc["key_truncated"] = True
    budget = max(MIN_DEAD_LETTER_VALUE_BYTES, max_bytes - len(key or b""))
    keep = min(len(raw), OVERSIZED_PREFIX_BYTES) if letter.reason == OVERSIZED else len(raw)
    value = _with_raw(doc, raw, keep)
    if len(value) <= budget:
        return value
    # The longest prefix that fits (the size grows with the prefix): a binary search, on
    # this rare path only. 0 bytes always fits: the rest of the document is bounded.
    low, high = 0, keep
    while low < high:
        mid = (low + high + 1) // 2
        if len(_with_raw(doc, raw, mid)) <= budget:
            low = mid
        else:
            high = mid - 1
    return _with_raw(doc, raw, low)


def _with_raw(doc: dict[str, Any], raw: bytes, keep: int) -> bytes:
    kept = raw[:keep]
    doc["raw_truncated"] = keep < len(raw)
    try:
        doc["raw"] = kept.decode("utf-8")
        doc["raw_encoding"] = "utf-8"
    except UnicodeDecodeError:
        doc["raw"] = base64.b64encode(kept).decode("ascii")
        doc["raw_encoding"] = "base64"
    return orjson.dumps(doc)


def encode_predictions(
    batch: FeatureBatch,
    values: list[float] | list[list[float]],
    *,
    model: str,
    version: str,
    served_at: float,
    extra: dict[str, Any] | None = None,
) -> list[bytes]:
    """One prediction JSON per event of the batch, stamped with model and version."""
    dumps = orjson.dumps
    base = {"model": model, "version": version, "served_at": served_at, **(extra or {})}
    out = []
    for event_id, value, ts in zip(batch.ids, values, batch.ts, strict=True):
        doc = {"id": event_id, "prediction": value, **base}
        if ts is not None:
            doc["ts"] = ts
        out.append(dumps(doc))
    return out
