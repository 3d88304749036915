"""The decoder: every kind of bad input becomes a dead letter with its exact reason code."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import numpy as np
import orjson
import pytest

from stream_infer.core import serde
from stream_infer.core.events import DeadLetter, FeatureBatch
from stream_infer.core.serde import FeatureDecoder, encode_dead_letter, encode_predictions
from stream_infer.errors import InvalidEvent

FEATURES = ("a", "b", "c")
MAX_EVENT_BYTES = 4096


def event(**fields: Any) -> bytes:
    """A feature event as the wire carries it; ``features`` defaults to a valid list."""
    fields.setdefault("id", "e1")
    fields.setdefault("features", [1.0, 2.0, 3.0])
    return json.dumps(fields).encode()


def without(name: str) -> bytes:
    doc: dict[str, Any] = {"id": "e1", "features": [1.0, 2.0, 3.0]}
    del doc[name]
    return json.dumps(doc).encode()


@pytest.fixture
def decoder() -> FeatureDecoder:
    return FeatureDecoder(FEATURES, max_event_bytes=MAX_EVENT_BYTES)


BAD_EVENTS: list[tuple[str, bytes | None, str]] = [
    ("none", None, serde.EMPTY),
    ("zero bytes", b"", serde.EMPTY),
    ("oversized", event(pad="x" * MAX_EVENT_BYTES), serde.OVERSIZED),
    ("truncated json", b'{"id": "e1", "features": [1, 2', serde.INVALID_JSON),
    ("trailing comma", b'{"id": "e1",}', serde.INVALID_JSON),
    ("binary junk", b"\xff\xfe\x00\x81junk", serde.INVALID_JSON),
    (
        "latin-1 text",
        '{"id": "caf\u00e9", "features": [1, 2, 3]}'.encode("latin-1"),
        serde.INVALID_JSON,
    ),
    ("NaN token", b'{"id": "e1", "features": [NaN, 2, 3]}', serde.INVALID_JSON),
    ("Infinity token", b'{"id": "e1", "features": [Infinity, 2, 3]}', serde.INVALID_JSON),
    ("-Infinity token", b'{"id": "e1", "features": [-Infinity, 2, 3]}', serde.INVALID_JSON),
    ("number beyond double", b'{"id": "e1", "features": [1e400, 2, 3]}', serde.INVALID_JSON),
    ("array", b"[1, 2, 3]", serde.NOT_AN_OBJECT),
    ("string", b'"hello"', serde.NOT_AN_OBJECT),
    ("number", b"42", serde.NOT_AN_OBJECT),
    ("null", b"null", serde.NOT_AN_OBJECT),
    ("boolean", b"true", serde.NOT_AN_OBJECT),
    ("v 2", event(v=2), serde.SCHEMA_MISMATCH),
    ("v '1'", event(v="1"), serde.SCHEMA_MISMATCH),
    ("v true", event(v=True), serde.SCHEMA_MISMATCH),
    ("v 1.0", event(v=1.0), serde.SCHEMA_MISMATCH),
    ("v null", event(v=None), serde.SCHEMA_MISMATCH),
    ("id missing", without("id"), serde.INVALID_ID),
    ("id int", event(id=7), serde.INVALID_ID),
    ("id empty", event(id=""), serde.INVALID_ID),
    ("id too long", event(id="x" * 513), serde.INVALID_ID),
    ("id null", event(id=None), serde.INVALID_ID),
    ("id list", event(id=["e1"]), serde.INVALID_ID),
    ("ts string", event(ts="2024-01-01T00:00:00Z"), serde.INVALID_TS),
    ("ts true", event(ts=True), serde.INVALID_TS),
    ("ts object", event(ts={"s": 1}), serde.INVALID_TS),
    ("features missing", without("features"), serde.MISSING_FEATURES),
    ("features null", event(features=None), serde.MISSING_FEATURES),
    ("features string", event(features="1,2,3"), serde.INVALID_FEATURE_TYPE),
    ("features number", event(features=3), serde.INVALID_FEATURE_TYPE),
    ("features true", event(features=True), serde.INVALID_FEATURE_TYPE),
    ("one name missing", event(features={"a": 1, "b": 2}), serde.MISSING_FEATURE),
    ("one name misspelt", event(features={"a": 1, "b": 2, "C": 3}), serde.MISSING_FEATURE),
    ("empty object", event(features={}), serde.MISSING_FEATURE),
    (
        "extra name",
        event(features={"a": 1, "b": 2, "c": 3, "d": 4}),
        serde.UNEXPECTED_FEATURE,
    ),
    ("list too short", event(features=[1, 2]), serde.WRONG_FEATURE_COUNT),
    ("list too long", event(features=[1, 2, 3, 4]), serde.WRONG_FEATURE_COUNT),
    ("empty list", event(features=[]), serde.WRONG_FEATURE_COUNT),
    ("string in list", event(features=[1, "2", 3]), serde.INVALID_FEATURE_TYPE),
    ("bool in list", event(features=[1, True, 3]), serde.INVALID_FEATURE_TYPE),
    ("null in list", event(features=[1, None, 3]), serde.INVALID_FEATURE_TYPE),
    ("nested list", event(features=[1, [2], 3]), serde.INVALID_FEATURE_TYPE),
    ("string in object", event(features={"a": 1, "b": "2", "c": 3}), serde.INVALID_FEATURE_TYPE),
    ("bool in object", event(features={"a": 1, "b": False, "c": 3}), serde.INVALID_FEATURE_TYPE),
    ("null in object", event(features={"a": 1, "b": None, "c": 3}), serde.INVALID_FEATURE_TYPE),
    ("object in object", event(features={"a": 1, "b": {}, "c": 3}), serde.INVALID_FEATURE_TYPE),
]


@pytest.mark.parametrize(
    ("raw", "reason"), [c[1:] for c in BAD_EVENTS], ids=[c[0] for c in BAD_EVENTS]
)
def test_decode_one_names_the_reason(
    decoder: FeatureDecoder, raw: bytes | None, reason: str
) -> None:
    with pytest.raises(InvalidEvent) as info:
        decoder.decode_one(raw)
    assert info.value.reason == reason
    assert info.value.detail
    assert str(info.value).startswith(f"{reason}: ")


@pytest.mark.parametrize(
    ("raw", "reason"), [c[1:] for c in BAD_EVENTS], ids=[c[0] for c in BAD_EVENTS]
)
def test_decode_batch_dead_letters_a_bad_event(
    decoder: FeatureDecoder, make_record: Any, raw: bytes | None, reason: str
) -> None:
    record = make_record(raw, b"k")
    batch, dead = decoder.decode_batch([record])

    assert len(batch) == 0
    assert batch.x.shape == (0, len(FEATURES))
    assert batch.x.dtype == np.float32
    assert [(d.reason, d.record) for d in dead] == [(reason, record)]


def test_every_decode_reason_is_exercised() -> None:
    not_decoding = {
        serde.MODEL_FAILED,
        serde.MODEL_OUTPUT_INVALID,
        serde.MODEL_TIMEOUT,
        serde.UNDELIVERABLE,
        serde.INVALID_LABEL,  # the labels topic's: decode_labels
    }
    tested = {c[2] for c in BAD_EVENTS} | {serde.NON_FINITE_FEATURE}
    assert tested == set(serde.REASONS) - not_decoding


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (event(features=[1, 2]), "got 2 features, expected 3"),
        (event(features={"a": 1, "b": 2}), "missing ['c']"),
        (event(features={"a": 1, "b": 2, "cc": 3}), "missing ['c'], unexpected ['cc']"),
        (event(features={"a": 1, "b": 2, "c": 3, "zz": 4, "d": 5}), "unexpected ['d', 'zz']"),
        (event(features=[1, "x", 3]), "got str"),
        (event(v=2), "schema version 2"),
        (event(ts="soon"), "got 'soon'"),
        (b"[1]", "got list"),
    ],
)
def test_details_say_what_arrived(decoder: FeatureDecoder, raw: bytes, fragment: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        decoder.decode_one(raw)
    assert fragment in info.value.detail


def test_oversized_is_checked_before_parsing(make_record: Any) -> None:
    small = FeatureDecoder(FEATURES, max_event_bytes=64)
    raw = b"not json at all, and longer than sixty-four bytes ......................"
    _, dead = small.decode_batch([make_record(raw)])
    assert [d.reason for d in dead] == [serde.OVERSIZED]
    assert f"{len(raw)} bytes, the limit is 64" in dead[0].detail


def test_an_event_of_exactly_the_limit_is_accepted() -> None:
    raw = event(pad="")
    raw = event(pad="x" * (MAX_EVENT_BYTES - len(raw)))
    assert len(raw) == MAX_EVENT_BYTES
    decoder = FeatureDecoder(FEATURES, max_event_bytes=MAX_EVENT_BYTES)
    assert decoder.decode_one(raw)[0] == "e1"
    with pytest.raises(InvalidEvent, match="oversized"):
        decoder.decode_one(raw[:-2] + b'x"}')


def test_an_id_of_512_characters_is_accepted(decoder: FeatureDecoder) -> None:
    long_id = "\u00e9" * 512  # counted in characters, not in UTF-8 bytes (1024 here)
    assert decoder.decode_one(event(id=long_id))[0] == long_id


@pytest.mark.parametrize("value", [1e300, -1e300, 3.5e38, 2.0**128])
def test_a_feature_beyond_float32_is_non_finite(
    decoder: FeatureDecoder, make_record: Any, value: float
) -> None:
    good = make_record(event(id="ok"))
    bad = make_record(event(id="big", features=[1.0, value, 3.0]))
    batch, dead = decoder.decode_batch([good, bad])

    assert batch.ids == ["ok"]
    assert [(d.reason, d.record) for d in dead] == [(serde.NON_FINITE_FEATURE, bad)]
    assert "float32" in dead[0].detail


def test_the_largest_float32_is_finite(decoder: FeatureDecoder, make_record: Any) -> None:
    biggest = float(np.finfo(np.float32).max)
    batch, dead = decoder.decode_batch([make_record(event(features=[biggest, -biggest, 0]))])
    assert dead == []
    assert batch.x[0].tolist() == [biggest, -biggest, 0.0]


def test_good_events_in_both_forms(decoder: FeatureDecoder, make_record: Any) -> None:
    records = [
        make_record(event(id="d", features={"c": 3, "a": 1.5, "b": -2}, ts=1700000000.25), b"kd"),
        make_record(event(id="l", features=[4, 5.5, 6], v=1, source="sensor-7"), b"kl"),
        make_record(event(id="n", features=[0, 0, 0], ts=None)),
    ]
    batch, dead = decoder.decode_batch(records)

    assert dead == []
    assert batch.ids == ["d", "l", "n"]
    assert batch.keys == [b"kd", b"kl", b"n"]  # no Kafka key: the id is the key
    assert batch.ts == [1700000000.25, None, None]
    assert batch.positions == [0, 1, 2]
    assert batch.x.dtype == np.float32
    assert batch.x.shape == (3, 3)
    assert batch.x.flags.c_contiguous
    np.testing.assert_array_equal(batch.x, [[1.5, -2, 3], [4, 5.5, 6], [0, 0, 0]])


def test_decode_one_returns_the_row_in_topology_order(decoder: FeatureDecoder) -> None:
    raw = event(id="x", features={"b": 2, "c": 3, "a": 1}, ts=5)
    assert decoder.decode_one(raw) == ("x", [1, 2, 3], 5)


def test_an_empty_key_falls_back_to_the_id(decoder: FeatureDecoder, make_record: Any) -> None:
    batch, _ = decoder.decode_batch([make_record(event(id="e9"), b"")])
    assert batch.keys == [b"e9"]


def test_integers_beyond_int64_are_features(decoder: FeatureDecoder, make_record: Any) -> None:
    raw = b'{"id": "big", "features": [18446744073709551615, -9223372036854775809, 1]}'
    batch, dead = decoder.decode_batch([make_record(raw)])
    assert dead == []
    np.testing.assert_allclose(batch.x[0], [1.8446744e19, -9.223372e18, 1], rtol=1e-6)


def test_positions_survive_interleaved_bad_records(
    decoder: FeatureDecoder, make_record: Any
) -> None:
    records = [
        make_record(event(id="g0", features=[0, 0, 0])),
        make_record(b"{oops"),
        make_record(event(id="g1", features=[1, 1, 1])),
        make_record(event(id="huge", features=[1e300, 0, 0])),
        make_record(event(id=""), b"k-bad-id"),
        make_record(event(id="g2", features=[2, 2, 2])),
    ]
    batch, dead = decoder.decode_batch(records)

    assert batch.ids == ["g0", "g1", "g2"]
    assert batch.positions == [0, 2, 5]
    assert batch.x[:, 0].tolist() == [0, 1, 2]
    assert [records[p] for p in batch.positions] == [records[0], records[2], records[5]]
    assert [(d.reason, d.record) for d in dead] == [
        (serde.INVALID_JSON, records[1]),
        (serde.INVALID_ID, records[4]),
        (serde.NON_FINITE_FEATURE, records[3]),
    ]


def test_an_empty_batch(decoder: FeatureDecoder) -> None:
    batch, dead = decoder.decode_batch([])
    assert (len(batch), dead) == (0, [])
    assert batch.x.shape == (0, 3)


def test_a_decoder_needs_features() -> None:
    with pytest.raises(ValueError, match="at least one feature"):
        FeatureDecoder([], max_event_bytes=1024)


# --- encode_dead_letter ---------------------------------------------------------------------


def dead_letter_doc(letter: DeadLetter, now: float = 123.5) -> dict[str, Any]:
    doc = orjson.loads(encode_dead_letter(letter, now=now))
    assert isinstance(doc, dict)
    return doc


def test_a_dead_letter_keeps_utf8_text_and_its_origin(make_record: Any) -> None:
    raw = '{"id": 7, "note": "caf\u00e9"}'.encode()
    record = make_record(raw, b"user-7", topic="in", partition=3, offset=42)
    doc = dead_letter_doc(DeadLetter(serde.INVALID_ID, "bad id", record))

    assert doc == {
        "error": "invalid_id",
        "detail": "bad id",
        "topic": "in",
        "partition": 3,
        "offset": 42,
        "ts": 123.5,
        "key": "user-7",
        "raw": raw.decode(),
        "raw_encoding": "utf-8",
        "raw_bytes": len(raw),
        "raw_truncated": False,
    }


def test_a_dead_letter_base64_encodes_binary(make_record: Any) -> None:
    raw = b"\xff\x00\xfejunk\x80"
    doc = dead_letter_doc(DeadLetter(serde.INVALID_JSON, "x", make_record(raw)))
    assert doc["raw_encoding"] == "base64"
    assert base64.b64decode(doc["raw"], validate=True) == raw
    assert doc["raw_bytes"] == len(raw)
    assert doc["raw_truncated"] is False


def test_an_oversized_payload_is_cut_to_4_kib(make_record: Any) -> None:
    raw = b"x" * 10_000
    doc = dead_letter_doc(DeadLetter(serde.OVERSIZED, "too big", make_record(raw)))
    assert doc["raw"] == "x" * 4096
    assert doc["raw_bytes"] == 10_000
    assert doc["raw_truncated"] is True


def test_a_cut_that_splits_a_character_falls_back_to_base64(make_record: Any) -> None:
    raw = b"x" * 4095 + "\u00e9".encode() * 10  # byte 4096 is the first half of an e-acute
    doc = dead_letter_doc(DeadLetter(serde.OVERSIZED, "too big", make_record(raw)))
    assert doc["raw_encoding"] == "base64"
    assert base64.b64decode(doc["raw"]) == raw[:4096]
    assert doc["raw_truncated"] is True


def test_only_oversized_payloads_are_cut(make_record: Any) -> None:
    raw = b"{" * 10_000
    doc = dead_letter_doc(DeadLetter(serde.INVALID_JSON, "x", make_record(raw)))
    assert doc["raw"] == raw.decode()
    assert doc["raw_truncated"] is False


def test_a_dead_letter_of_nothing(make_record: Any) -> None:
    record = make_record(None, None, topic=None, partition=None, offset=None)
    doc = dead_letter_doc(DeadLetter(serde.EMPTY, "no value", record))
    assert "key" not in doc
    assert (doc["topic"], doc["partition"], doc["offset"]) == (None, None, None)
    assert (doc["raw"], doc["raw_bytes"], doc["raw_encoding"]) == ("", 0, "utf-8")


def test_a_binary_key_is_escaped(make_record: Any) -> None:
    doc = dead_letter_doc(DeadLetter(serde.EMPTY, "x", make_record(None, b"\xffk")))
    assert doc["key"] == "\\xffk"


def test_a_dead_letter_is_stamped_with_the_time_by_default(make_record: Any) -> None:
    before = time.time()
    doc = orjson.loads(encode_dead_letter(DeadLetter(serde.EMPTY, "x", make_record(None))))
    assert before <= doc["ts"] <= time.time()


# --- encode_predictions ---------------------------------------------------------------------


def small_batch() -> FeatureBatch:
    x = np.zeros((2, 3), dtype=np.float32)
    return FeatureBatch(ids=["a", "b"], keys=[b"ka", b"kb"], ts=[17.5, None], positions=[0, 1], x=x)


def test_predictions_are_stamped() -> None:
    out = encode_predictions(
        small_batch(), [0.25, 0.75], model="risk", version="v2", served_at=99.0
    )
    assert [orjson.loads(o) for o in out] == [
        {
            "id": "a",
            "prediction": 0.25,
            "model": "risk",
            "version": "v2",
            "served_at": 99.0,
            "ts": 17.5,
        },
        {"id": "b", "prediction": 0.75, "model": "risk", "version": "v2", "served_at": 99.0},
    ]


def test_predictions_with_several_outputs_and_extra_fields() -> None:
    out = encode_predictions(
        small_batch(),
        [[0.1, 0.9], [0.6, 0.4]],
        model="m",
        version="v1",
        served_at=1.0,
        extra={"shadow": True},
    )
    docs = [orjson.loads(o) for o in out]
    assert [d["prediction"] for d in docs] == [[0.1, 0.9], [0.6, 0.4]]
    assert all(d["shadow"] is True for d in docs)


def test_predictions_must_match_the_batch() -> None:
    with pytest.raises(ValueError, match="zip"):
        encode_predictions(small_batch(), [0.5], model="m", version="v1", served_at=1.0)


# --- dead letters always fit (hardening item 6) ----------------------------------------------


def test_a_dead_letter_of_control_bytes_stays_under_its_cap(
    make_record: Any, validators: dict[str, Any]
) -> None:
    # Each control byte is escaped as \u00XX (6 bytes): 200 kB of them used to become a 1.2 MB
    # dead letter, over librdkafka's message.max.bytes (produce() raised MSG_SIZE_TOO_LARGE).
    decoder = FeatureDecoder(["a"], max_event_bytes=1024 * 1024)
    raw = b"\x01" * 200_000
    _, dead = decoder.decode_batch([make_record(raw, b"k")])
    cap = 64 * 1024
    value = encode_dead_letter(dead[0], now=0.0, max_bytes=cap)
    assert len(value) + len(b"k") <= cap
    doc = orjson.loads(value)
    validators["dead-letter"].validate(doc)
    assert doc["error"] == "invalid_json"
    assert doc["raw_truncated"] is True
    assert doc["raw_bytes"] == len(raw)
    kept = doc["raw"].encode()
    assert len(kept) > 0 and raw.startswith(kept)
    # It keeps as much as fits: at most one character's escape (6 bytes) more would overflow.
    assert len(value) > cap - len(b"k") - 7


@pytest.mark.parametrize("reason", [serde.INVALID_JSON, serde.OVERSIZED])
def test_a_binary_dead_letter_stays_under_its_cap(make_record: Any, reason: str) -> None:
    raw = bytes(range(256)) * 4000  # ~1 MB, not UTF-8: base64 adds a third
    key = b"user-1"
    value = encode_dead_letter(
        DeadLetter(reason, "x", make_record(raw, key)), now=0.0, max_bytes=100_000
    )
    assert len(value) + len(key) <= 100_000
    doc = orjson.loads(value)
    assert doc["raw_encoding"] == "base64"
    assert raw.startswith(base64.b64decode(doc["raw"], validate=True))
    assert doc["raw_truncated"] is True


def test_a_huge_key_is_cut_in_the_document(make_record: Any) -> None:
    key = b"k" * 100_000
    value = encode_dead_letter(
        DeadLetter(serde.INVALID_JSON, "x", make_record(b"{", key)), now=0.0, max_bytes=256_000
    )
    doc = orjson.loads(value)
    assert doc["key"] == "k" * serde.MAX_KEY_CHARS
    assert doc["key_truncated"] is True
    assert len(value) + len(key) <= 256_000


def test_a_dead_letter_that_fits_is_whole(make_record: Any) -> None:
    raw = b"\x01" * 1000
    value = encode_dead_letter(
        DeadLetter(serde.INVALID_JSON, "x", make_record(raw)), now=0.0, max_bytes=64 * 1024
    )
    doc = orjson.loads(value)
    assert doc["raw"].encode() == raw
    assert doc["raw_truncated"] is False
