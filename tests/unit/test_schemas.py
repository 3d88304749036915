"""The JSON Schemas in schemas/ are valid draft 2020-12 and describe what the code reads and
writes: decoded events, encoded predictions and every kind of dead letter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from jsonschema import Draft202012Validator

from stream_infer.core import serde
from stream_infer.core.events import DeadLetter
from stream_infer.core.pipeline import ModelOutput, Pipeline, RoutingSnapshot
from stream_infer.core.routing import Route
from stream_infer.core.serde import FeatureDecoder, encode_dead_letter, encode_predictions

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"
SCHEMA_NAMES = ("feature-event", "prediction", "dead-letter", "control-command", "control-ack")
FEATURES = ("a", "b", "c")
FLOAT32_MAX = float(np.finfo(np.float32).max)


@pytest.fixture
def decoder() -> FeatureDecoder:
    return FeatureDecoder(FEATURES, max_event_bytes=4096)


def raw(doc: Any) -> bytes:
    return json.dumps(doc).encode()


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_each_schema_is_valid_and_documented(name: str) -> None:
    schema = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].endswith(name)
    assert schema["title"]
    assert schema["description"]
    undocumented = [k for k, v in schema["properties"].items() if not v.get("description")]
    assert undocumented == []
    assert set(schema["required"]) <= set(schema["properties"])


def test_there_is_one_schema_per_wire_type() -> None:
    assert sorted(p.name for p in SCHEMA_DIR.glob("*.json")) == sorted(
        f"{n}.schema.json" for n in SCHEMA_NAMES
    )


def test_the_dead_letter_reasons_are_the_code_reasons(
    validators: dict[str, Draft202012Validator],
) -> None:
    schema = validators["dead-letter"].schema
    assert schema["properties"]["error"]["enum"] == list(serde.REASONS)
    for reason in serde.REASONS:
        assert f"`{reason}`" in schema["description"], f"{reason} is not documented"


# --- feature events -------------------------------------------------------------------------

GOOD_EVENTS = [
    {"id": "e1", "features": [1, 2, 3]},
    {"id": "e2", "features": {"c": 3.5, "a": -1, "b": 0}},
    {"id": "e3", "features": [0.1, 0.2, 0.3], "ts": 1700000000.5, "v": 1},
    {"id": "e4", "features": [1, 2, 3], "ts": 1700000000},
    {"id": "e5", "features": [1, 2, 3], "ts": None, "source": "sensor", "tags": ["x"]},
    {"id": "x" * 512, "features": [FLOAT32_MAX, -FLOAT32_MAX, 0]},
    {"id": "\u00e9" * 512, "features": [18446744073709551615, -9223372036854775808, 1e38]},
]


@pytest.mark.parametrize("doc", GOOD_EVENTS, ids=range(len(GOOD_EVENTS)))
def test_good_events_decode_and_validate(
    validators: dict[str, Draft202012Validator], decoder: FeatureDecoder, doc: dict[str, Any]
) -> None:
    decoder.decode_one(raw(doc))  # raises if the decoder refuses it
    validators["feature-event"].validate(orjson.loads(raw(doc)))


BAD_EVENTS = [
    ("missing id", {"features": [1, 2, 3]}, serde.INVALID_ID),
    ("empty id", {"id": "", "features": [1, 2, 3]}, serde.INVALID_ID),
    ("int id", {"id": 7, "features": [1, 2, 3]}, serde.INVALID_ID),
    ("id too long", {"id": "x" * 513, "features": [1, 2, 3]}, serde.INVALID_ID),
    ("string feature", {"id": "e", "features": [1, "2", 3]}, serde.INVALID_FEATURE_TYPE),
    (
        "bool feature",
        {"id": "e", "features": {"a": 1, "b": True, "c": 3}},
        serde.INVALID_FEATURE_TYPE,
    ),
    ("null feature", {"id": "e", "features": [1, None, 3]}, serde.INVALID_FEATURE_TYPE),
    ("nested feature", {"id": "e", "features": [[1], 2, 3]}, serde.INVALID_FEATURE_TYPE),
    ("features a string", {"id": "e", "features": "1,2,3"}, serde.INVALID_FEATURE_TYPE),
    ("features missing", {"id": "e"}, serde.MISSING_FEATURES),
    ("features null", {"id": "e", "features": None}, serde.MISSING_FEATURES),
    ("no features", {"id": "e", "features": []}, serde.WRONG_FEATURE_COUNT),
    ("float32 overflow", {"id": "e", "features": [1e300, 2, 3]}, serde.NON_FINITE_FEATURE),
    ("just past float32", {"id": "e", "features": [-(2.0**128), 2, 3]}, serde.NON_FINITE_FEATURE),
    ("ts string", {"id": "e", "features": [1, 2, 3], "ts": "now"}, serde.INVALID_TS),
    ("ts bool", {"id": "e", "features": [1, 2, 3], "ts": False}, serde.INVALID_TS),
    ("v 2", {"id": "e", "features": [1, 2, 3], "v": 2}, serde.SCHEMA_MISMATCH),
    ("v '1'", {"id": "e", "features": [1, 2, 3], "v": "1"}, serde.SCHEMA_MISMATCH),
    ("v true", {"id": "e", "features": [1, 2, 3], "v": True}, serde.SCHEMA_MISMATCH),
    ("an array", [{"id": "e", "features": [1, 2, 3]}], serde.NOT_AN_OBJECT),
]


@pytest.mark.parametrize(
    ("doc", "reason"), [c[1:] for c in BAD_EVENTS], ids=[c[0] for c in BAD_EVENTS]
)
def test_bad_events_fail_the_schema_and_the_decoder(
    validators: dict[str, Draft202012Validator],
    decoder: FeatureDecoder,
    make_record: Any,
    doc: Any,
    reason: str,
) -> None:
    assert not validators["feature-event"].is_valid(doc)
    _, dead = decoder.decode_batch([make_record(raw(doc))])
    assert [d.reason for d in dead] == [reason]


# --- predictions ----------------------------------------------------------------------------


def test_encoded_predictions_validate(
    validators: dict[str, Draft202012Validator], decoder: FeatureDecoder, make_record: Any
) -> None:
    records = [
        make_record(raw({"id": "p1", "features": [1, 2, 3], "ts": 1700000000.5})),
        make_record(raw({"id": "p2", "features": [1, 2, 3]})),
    ]
    batch, _ = decoder.decode_batch(records)
    scalar = encode_predictions(batch, [0.5, 1.0], model="m", version="v1", served_at=1.7e9)
    vector = encode_predictions(
        batch, [[0.1, 0.9], [1.0, 0.0]], model="m", version="v2", served_at=1.7e9
    )
    extra = encode_predictions(
        batch, [3, -2.5], model="m", version="v3", served_at=1.7e9, extra={"shadow": True}
    )
    for payload in scalar + vector + extra:
        validators["prediction"].validate(orjson.loads(payload))


class _Missing:
    """Marks a field to delete; its repr keeps the test ids stable."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()


@pytest.mark.parametrize(
    "change",
    [
        {"version": MISSING},
        {"model": 3},
        {"prediction": "0.5"},
        {"prediction": [0.5, None]},
        {"prediction": []},
        {"served_at": "2024-01-01"},
        {"ts": None},
    ],
    ids=str,
)
def test_malformed_predictions_fail(
    validators: dict[str, Draft202012Validator], change: dict[str, Any]
) -> None:
    doc = {"id": "p", "model": "m", "version": "v1", "prediction": 0.5, "served_at": 1.0}
    validators["prediction"].validate(doc)
    doc.update(change)
    doc = {k: v for k, v in doc.items() if v is not MISSING}
    assert not validators["prediction"].is_valid(doc)


# --- dead letters ---------------------------------------------------------------------------

# One payload per reason the decoder gives (given FEATURES and max_event_bytes=4096).
DECODE_FAILURES = {
    serde.OVERSIZED: b"x" * 5000,
    serde.EMPTY: b"",
    serde.INVALID_JSON: b"\xff\xfe not json",
    serde.NOT_AN_OBJECT: b"[1, 2, 3]",
    serde.SCHEMA_MISMATCH: raw({"id": "e", "features": [1, 2, 3], "v": 2}),
    serde.INVALID_ID: raw({"id": "", "features": [1, 2, 3]}),
    serde.INVALID_TS: raw({"id": "e", "features": [1, 2, 3], "ts": "now"}),
    serde.MISSING_FEATURES: raw({"id": "e"}),
    serde.MISSING_FEATURE: raw({"id": "e", "features": {"a": 1, "b": 2}}),
    serde.UNEXPECTED_FEATURE: raw({"id": "e", "features": {"a": 1, "b": 2, "c": 3, "d": 4}}),
    serde.WRONG_FEATURE_COUNT: raw({"id": "e", "features": [1, 2]}),
    serde.INVALID_FEATURE_TYPE: raw({"id": "e", "features": [1, "2", 3]}),
    serde.NON_FINITE_FEATURE: raw({"id": "e", "features": [1e300, 2, 3]}),
}


@pytest.mark.parametrize("reason", list(DECODE_FAILURES))
def test_dead_letters_from_the_decoder_validate(
    validators: dict[str, Draft202012Validator],
    decoder: FeatureDecoder,
    make_record: Any,
    reason: str,
) -> None:
    record = make_record(DECODE_FAILURES[reason], b"key-1", partition=2, offset=99)
    _, dead = decoder.decode_batch([record])
    assert [d.reason for d in dead] == [reason]
    doc = orjson.loads(encode_dead_letter(dead[0]))
    validators["dead-letter"].validate(doc)


class FailingPredictor:
    """Raises on rows whose first feature is 13, returns NaN where it is 7."""

    model = "m"
    version = "v1"

    def predict_many(self, x: np.ndarray) -> np.ndarray:
        if (x[:, 0] == 13).any():
            raise RuntimeError("unlucky row")
        return np.where(x[:, 0] == 7, np.nan, 0.5)


def test_dead_letters_from_the_model_validate(
    validators: dict[str, Draft202012Validator], decoder: FeatureDecoder, make_record: Any
) -> None:
    pipeline = Pipeline(
        decoder, [ModelOutput("m", "preds")], dead_letter_topic="dlq", shadow_topic=None
    )
    serving = RoutingSnapshot(
        routes={"m": Route.single("v1")}, predictors={("m", "v1"): FailingPredictor()}
    )
    records = [make_record(raw({"id": f"e{i}", "features": [i, 0, 0]})) for i in (1, 7, 13)]

    result = pipeline.process(records, serving)

    docs = [orjson.loads(r.value) for r in result.records if r.topic == "dlq"]
    assert sorted(d["error"] for d in docs) == [serde.MODEL_FAILED, serde.MODEL_OUTPUT_INVALID]
    for doc in docs:
        validators["dead-letter"].validate(doc)
    for r in result.records:
        if r.topic == "preds":
            validators["prediction"].validate(orjson.loads(r.value))


def test_every_reason_has_a_valid_dead_letter(
    validators: dict[str, Draft202012Validator], make_record: Any
) -> None:
    """Every reason code, and a record with no origin."""
    record = make_record(None, None, topic=None, partition=None, offset=None)
    for reason in serde.REASONS:
        doc = orjson.loads(encode_dead_letter(DeadLetter(reason, "detail", record)))
        validators["dead-letter"].validate(doc)


def good_dead_letter(**change: Any) -> dict[str, Any]:
    doc = {
        "error": "invalid_json",
        "detail": "d",
        "raw": "AAEC",
        "raw_encoding": "base64",
        "raw_bytes": 3,
        "raw_truncated": False,
        "topic": "in",
        "partition": 0,
        "offset": 5,
        "ts": 1.0,
    }
    doc.update(change)
    return doc


@pytest.mark.parametrize(
    "change",
    [
        {"error": "exploded"},
        {"raw_encoding": "hex"},
        {"raw": "not base64!"},
        {"raw_truncated": "yes"},
        {"key_truncated": 1},
        {"raw_bytes": -1},
        {"partition": "0"},
        {"offset": 1.5},
        {"key": None},
        {"ts": None},
    ],
    ids=str,
)
def test_malformed_dead_letters_fail(
    validators: dict[str, Draft202012Validator], change: dict[str, Any]
) -> None:
    validators["dead-letter"].validate(good_dead_letter())
    assert not validators["dead-letter"].is_valid(good_dead_letter(**change))


def test_a_dead_letter_missing_a_field_fails(validators: dict[str, Draft202012Validator]) -> None:
    for field in validators["dead-letter"].schema["required"]:
        doc = good_dead_letter()
        del doc[field]
        assert not validators["dead-letter"].is_valid(doc), field
