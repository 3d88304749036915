"""Properties of the decoder: whatever arrives, each record ends as exactly one good row or one
dead letter, and nothing else escapes. Events that decode also satisfy the JSON Schema."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from stream_infer.core import serde
from stream_infer.core.events import Record
from stream_infer.core.serde import FeatureDecoder, encode_dead_letter
from stream_infer.errors import InvalidEvent

FEATURES = ("a", "b", "c")
MAX_EVENT_BYTES = 512
DECODE_REASONS = set(serde.REASONS) - {
    serde.MODEL_FAILED,
    serde.MODEL_OUTPUT_INVALID,
    serde.MODEL_TIMEOUT,
    serde.UNDELIVERABLE,
}

PROPERTY = settings(
    max_examples=300,
    database=None,
    deadline=None,
    # make_record is a stateless factory: sharing it between examples is harmless.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and infinities included: json.dumps writes them as bare tokens
    | st.text(max_size=8)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
feature_values = (
    st.floats(width=32, allow_nan=False, allow_infinity=False)
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | json_values
)
feature_names = st.sampled_from((*FEATURES, "zz"))
near_events = st.fixed_dictionaries(
    {
        "id": st.text(min_size=1, max_size=12) | json_values,
        "features": st.dictionaries(feature_names, feature_values, min_size=2, max_size=4)
        | st.lists(feature_values, min_size=2, max_size=4)
        | json_values,
    },
    optional={
        "ts": st.floats() | st.integers(0, 2**64) | json_values,
        "v": st.sampled_from([1, 2, 1.0, "1", True, None]),
        "extra": json_values,
    },
)
well_formed_events = st.fixed_dictionaries(
    {
        "id": st.text(min_size=1, max_size=12),
        "features": st.lists(
            st.floats(width=32, allow_nan=False, allow_infinity=False)
            | st.integers(-(2**63), 2**64 - 1),
            min_size=3,
            max_size=3,
        )
        | st.fixed_dictionaries({name: st.floats(allow_nan=False) for name in FEATURES}),
    },
    optional={"ts": st.none() | st.floats(allow_nan=False, allow_infinity=False), "v": st.just(1)},
)


@st.composite
def payloads(draw: st.DrawFn) -> bytes | None:
    """Raw record values: junk bytes, or JSON of anything event-like (valid or not)."""
    kind = draw(st.sampled_from(["bytes", "json", "event", "well_formed"]))
    if kind == "bytes":
        return draw(st.none() | st.binary(max_size=MAX_EVENT_BYTES + 64))
    obj = draw({"json": json_values, "event": near_events, "well_formed": well_formed_events}[kind])
    text = json.dumps(obj, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate makes invalid UTF-8


# (value, key) pairs; the tests wrap them in records with the make_record fixture.
record_lists = st.lists(
    st.tuples(payloads(), st.none() | st.binary(min_size=1, max_size=8)), max_size=8
)
DECODER = FeatureDecoder(FEATURES, max_event_bytes=MAX_EVENT_BYTES)


def check_split(records: Sequence[Record]) -> None:
    batch, dead = DECODER.decode_batch(records)

    # Each record is exactly one good row or one dead letter.
    good_ids = {id(records[p]) for p in batch.positions}
    dead_ids = [id(d.record) for d in dead]
    assert len(batch) + len(dead) == len(records)
    assert len(good_ids) == len(batch)
    assert len(set(dead_ids)) == len(dead)
    assert good_ids.isdisjoint(dead_ids)
    assert good_ids | set(dead_ids) == {id(r) for r in records}
    assert batch.positions == sorted(batch.positions)

    assert batch.x.dtype == np.float32
    assert batch.x.shape == (len(batch), len(FEATURES))
    assert np.isfinite(batch.x).all()
    assert len(batch.ids) == len(batch.keys) == len(batch.ts) == len(batch)

    for i, pos in enumerate(batch.positions):
        event_id, row, ts = DECODER.decode_one(records[pos].value())
        assert (batch.ids[i], batch.ts[i]) == (event_id, ts)
        assert batch.keys[i] == (records[pos].key() or event_id.encode())
        np.testing.assert_array_equal(batch.x[i], np.asarray(row, dtype=np.float32))

    for letter in dead:
        assert letter.reason in DECODE_REASONS
        if letter.reason != serde.NON_FINITE_FEATURE:
            try:
                DECODER.decode_one(letter.record.value())
            except InvalidEvent as exc:
                assert exc.reason == letter.reason
            else:
                raise AssertionError(f"decode_one accepted what decode_batch refused: {letter}")
        # The dead letter carries the payload back intact.
        doc = orjson.loads(encode_dead_letter(letter, now=0.0))
        raw = letter.record.value() or b""
        kept = base64.b64decode(doc["raw"]) if doc["raw_encoding"] == "base64" else doc["raw"]
        kept = kept if isinstance(kept, bytes) else kept.encode()
        assert kept == (raw[:4096] if doc["raw_truncated"] else raw)
        assert doc["raw_bytes"] == len(raw)


@PROPERTY
@given(pairs=record_lists)
def test_every_record_is_a_row_or_a_dead_letter(
    make_record: Any, pairs: list[tuple[bytes | None, bytes | None]]
) -> None:
    check_split([make_record(value, key) for value, key in pairs])


@PROPERTY
@given(values=st.lists(st.binary(max_size=64), max_size=8))
def test_random_bytes_never_escape_as_exceptions(make_record: Any, values: list[bytes]) -> None:
    check_split([make_record(value) for value in values])


@PROPERTY
@given(obj=near_events | well_formed_events | json_values)
def test_decoded_events_satisfy_the_schema(
    validators: dict[str, Draft202012Validator], make_record: Any, obj: Any
) -> None:
    """Accepted by the decoder => valid; refused as non-finite => invalid too."""
    raw = json.dumps(obj).encode("utf-8", "surrogatepass")
    batch, dead = DECODER.decode_batch([make_record(raw)])
    schema = validators["feature-event"]
    if len(batch):
        # orjson is the decoder's parser; the schema judges the same parsed document.
        errors = [e.message for e in schema.iter_errors(orjson.loads(raw))]
        assert errors == [], errors
    elif dead[0].reason == serde.NON_FINITE_FEATURE:
        assert not schema.is_valid(orjson.loads(raw))
