"""Bad input at volume: 10,000 malformed records of every kind, mixed at random (seeded) into
10,000 good ones, through one worker.

Every bad record must reach the dead-letter topic with the reason its kind calls for and its
original bytes; every good one (edge cases that are valid included) must get its prediction;
and the worker must ride it out: same process, no crash, no agent restart.

Records are told apart by where they landed: the producer's delivery report gives each one's
(partition, offset), and a dead letter carries the (partition, offset) it was read from.
"""

from __future__ import annotations

import base64
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import orjson
from confluent_kafka import KafkaError, Message, Producer

from stream_infer.core import serde
from stream_infer.examples import phishing
from stream_infer.examples.phishing import FEATURES
from tests.integration.conftest import Setup, metrics_text

SEED = 20_261
N_GOOD = 10_000
N_BAD = 10_000
MAX_EVENT_BYTES = 8192  # the test topology's limits.max_event_bytes
DEAD_LETTER_RAW_PREFIX = 4096  # an oversized record's dead letter keeps this much of it

Payload = bytes | None
Make = Callable[[int, random.Random], Payload]


@dataclass(frozen=True)
class Kind:
    name: str
    reason: str | None  # the expected dead-letter reason; None: valid, must be served
    make: Make


def _feats(rng: random.Random) -> dict[str, float]:
    return {name: rng.choice((-1.0, 0.0, 1.0)) for name in FEATURES}


_DROP = object()  # a field to leave out


def _event(i: int, rng: random.Random, **fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"id": f"x-{i}", "features": _feats(rng)}
    doc.update(fields)
    return {k: v for k, v in doc.items() if v is not _DROP}


def _json(i: int, rng: random.Random, **fields: Any) -> bytes:
    return orjson.dumps(_event(i, rng, **fields))


def _text(i: int, rng: random.Random, template: str) -> bytes:
    """A hand-written payload (for what orjson will not write: NaN tokens, bad escapes...)."""
    row = ", ".join(str(rng.choice((-1, 0, 1))) for _ in FEATURES[1:])
    return template.format(i=i, row=row).encode()


def _padded(doc: dict[str, Any], size: int) -> bytes:
    """A valid event made exactly `size` bytes long with trailing whitespace."""
    raw = orjson.dumps(doc)
    assert len(raw) <= size
    return raw + b" " * (size - len(raw))


def _dict_without(rng: random.Random, name: str) -> dict[str, float]:
    feats = _feats(rng)
    del feats[name]
    return feats


def _with_value(rng: random.Random, value: Any) -> dict[str, Any]:
    feats: dict[str, Any] = _feats(rng)
    feats[rng.choice(FEATURES)] = value
    return feats


def _junk(rng: random.Random, low: int, high: int) -> bytes:
    # 0xff never occurs in UTF-8, so this is never text, let alone JSON.
    return b"\xff" + rng.randbytes(rng.randint(low, high))


# fmt: off
BAD: tuple[Kind, ...] = (
    # The value itself
    Kind("null value", serde.EMPTY, lambda i, r: None),
    Kind("zero bytes", serde.EMPTY, lambda i, r: b""),
    Kind("oversized by one byte", serde.OVERSIZED,
         lambda i, r: _padded(_event(i, r), MAX_EVENT_BYTES + 1)),
    Kind("oversized, valid JSON", serde.OVERSIZED,
         lambda i, r: _padded(_event(i, r), r.randint(MAX_EVENT_BYTES + 2, 4 * MAX_EVENT_BYTES))),
    Kind("oversized binary", serde.OVERSIZED,
         lambda i, r: _junk(r, MAX_EVENT_BYTES, 3 * MAX_EVENT_BYTES)),
    # Not JSON
    Kind("binary junk", serde.INVALID_JSON, lambda i, r: _junk(r, 0, 200)),
    Kind("plain text", serde.INVALID_JSON, lambda i, r: f"not json {i}".encode()),
    Kind("truncated JSON", serde.INVALID_JSON, lambda i, r: _json(i, r)[: r.randint(1, 40)]),
    Kind("trailing garbage", serde.INVALID_JSON, lambda i, r: _json(i, r) + b"}"),
    Kind("whitespace only", serde.INVALID_JSON, lambda i, r: b" \n\t" * r.randint(1, 5)),
    Kind("UTF-8 BOM", serde.INVALID_JSON, lambda i, r: b"\xef\xbb\xbf" + _json(i, r)),
    Kind("NaN token", serde.INVALID_JSON,
         lambda i, r: _text(i, r, '{{"id": "x-{i}", "features": [NaN, {row}]}}')),
    Kind("Infinity token", serde.INVALID_JSON,
         lambda i, r: _text(i, r, '{{"id": "x-{i}", "features": [-Infinity, {row}]}}')),
    Kind("number beyond double", serde.INVALID_JSON,
         lambda i, r: _text(i, r, '{{"id": "x-{i}", "features": [1e400, {row}]}}')),
    Kind("lone surrogate", serde.INVALID_JSON,
         lambda i, r: _text(i, r, '{{"id": "x-{i}\\ud800", "features": [0, {row}]}}')),
    Kind("invalid UTF-8 in a string", serde.INVALID_JSON,
         lambda i, r: b'{"id": "x-' + str(i).encode() + b'\xc3\x28", "features": []}'),
    # JSON, not an object
    Kind("array", serde.NOT_AN_OBJECT, lambda i, r: orjson.dumps(list(_feats(r).values()))),
    Kind("string", serde.NOT_AN_OBJECT, lambda i, r: orjson.dumps(f"x-{i}")),
    Kind("number", serde.NOT_AN_OBJECT, lambda i, r: str(i).encode()),
    Kind("JSON null", serde.NOT_AN_OBJECT, lambda i, r: b"null"),
    Kind("boolean", serde.NOT_AN_OBJECT, lambda i, r: b"true"),
    # Schema version
    Kind("v 2", serde.SCHEMA_MISMATCH, lambda i, r: _json(i, r, v=2)),
    Kind("v '1'", serde.SCHEMA_MISMATCH, lambda i, r: _json(i, r, v="1")),
    Kind("v 1.0", serde.SCHEMA_MISMATCH, lambda i, r: _json(i, r, v=1.0)),
    Kind("v true", serde.SCHEMA_MISMATCH, lambda i, r: _json(i, r, v=True)),
    Kind("v null", serde.SCHEMA_MISMATCH, lambda i, r: _json(i, r, v=None)),
    # id
    Kind("no id", serde.INVALID_ID, lambda i, r: _json(i, r, id=_DROP)),
    Kind("numeric id", serde.INVALID_ID, lambda i, r: _json(i, r, id=i)),
    Kind("empty id", serde.INVALID_ID, lambda i, r: _json(i, r, id="")),
    Kind("null id", serde.INVALID_ID, lambda i, r: _json(i, r, id=None)),
    Kind("id of 513 characters", serde.INVALID_ID,
         lambda i, r: _json(i, r, id=f"x-{i}-".ljust(serde.MAX_ID_CHARS + 1, "x"))),
    # ts
    Kind("ts a string", serde.INVALID_TS, lambda i, r: _json(i, r, ts="yesterday")),
    Kind("ts a boolean", serde.INVALID_TS, lambda i, r: _json(i, r, ts=True)),
    Kind("ts an array", serde.INVALID_TS, lambda i, r: _json(i, r, ts=[1.0])),
    # features: missing, extra, wrong count
    Kind("no features", serde.MISSING_FEATURES, lambda i, r: _json(i, r, features=_DROP)),
    Kind("null features", serde.MISSING_FEATURES, lambda i, r: _json(i, r, features=None)),
    Kind("a feature missing", serde.MISSING_FEATURE,
         lambda i, r: _json(i, r, features=_dict_without(r, r.choice(FEATURES)))),
    Kind("empty features object", serde.MISSING_FEATURE, lambda i, r: _json(i, r, features={})),
    Kind("an extra feature", serde.UNEXPECTED_FEATURE,
         lambda i, r: _json(i, r, features=_feats(r) | {"extra": 1.0})),
    Kind("array too short", serde.WRONG_FEATURE_COUNT,
         lambda i, r: _json(i, r, features=list(_feats(r).values())[:-1])),
    Kind("array too long", serde.WRONG_FEATURE_COUNT,
         lambda i, r: _json(i, r, features=[*_feats(r).values(), 0.0])),
    Kind("empty array", serde.WRONG_FEATURE_COUNT, lambda i, r: _json(i, r, features=[])),
    # features: wrong types
    Kind("features a string", serde.INVALID_FEATURE_TYPE,
         lambda i, r: _json(i, r, features="1,2,3")),
    Kind("features a number", serde.INVALID_FEATURE_TYPE, lambda i, r: _json(i, r, features=5)),
    Kind("a string value", serde.INVALID_FEATURE_TYPE,
         lambda i, r: _json(i, r, features=_with_value(r, "1.0"))),
    Kind("a boolean value", serde.INVALID_FEATURE_TYPE,
         lambda i, r: _json(i, r, features=_with_value(r, True))),
    Kind("a null value", serde.INVALID_FEATURE_TYPE,
         lambda i, r: _json(i, r, features=_with_value(r, None))),
    Kind("a nested value", serde.INVALID_FEATURE_TYPE,
         lambda i, r: _json(i, r, features=_with_value(r, [1.0]))),
    Kind("a null in the array", serde.INVALID_FEATURE_TYPE,
         lambda i, r: _json(i, r, features=[None, *list(_feats(r).values())[1:]])),
    # features: beyond float32
    Kind("1e39", serde.NON_FINITE_FEATURE,
         lambda i, r: _json(i, r, features=_with_value(r, 1e39))),
    Kind("-3.5e38 in the array", serde.NON_FINITE_FEATURE,
         lambda i, r: _json(i, r, features=[-3.5e38, *list(_feats(r).values())[1:]])),
)

# A few records far over the limit (a share of N_BAD, not one kind in the cycle: they are big).
HUGE = Kind("huge (256-900 KiB)", serde.OVERSIZED,
            lambda i, r: _json(i, r, blob="z" * r.randint(262_144, 921_600)))
N_HUGE = 8

# Valid, however unusual: these must be served.
EDGE_GOOD: tuple[Kind, ...] = (
    Kind("exactly max_event_bytes", None,
         lambda i, r: _padded(_event(i, r, id=f"g-{i}"), MAX_EVENT_BYTES)),
    Kind("features as an array", None,
         lambda i, r: _json(i, r, id=f"g-{i}", features=list(_feats(r).values()))),
    Kind("explicit v 1", None, lambda i, r: _json(i, r, id=f"g-{i}", v=1)),
    Kind("null ts", None, lambda i, r: _json(i, r, id=f"g-{i}", ts=None)),
    Kind("integer features", None,
         lambda i, r: _json(i, r, id=f"g-{i}", features=dict.fromkeys(FEATURES, 1))),
    Kind("tiny and negative-zero values", None,
         lambda i, r: _json(i, r, id=f"g-{i}", features=dict.fromkeys(FEATURES, -0.0)
                            | {FEATURES[0]: 1e-300})),
    Kind("unknown top-level fields", None,
         lambda i, r: _json(i, r, id=f"g-{i}", source="test", tags=["a"])),
    Kind("id of 512 characters", None,
         lambda i, r: _json(i, r, id=f"g-{i}-".ljust(serde.MAX_ID_CHARS, "g"))),
)
# fmt: on


@dataclass
class Item:
    kind: Kind
    key: bytes | None
    value: Payload
    event_id: str | None = None  # good ones
    partition: int = -1
    offset: int = -1


def _key(i: int, rng: random.Random) -> bytes | None:
    """Most records keyed; some with no key, some with a key that is not UTF-8."""
    roll = rng.random()
    if roll < 0.2:
        return None
    if roll < 0.3:
        return b"\xfe\xff-" + str(i).encode()
    return f"k-{i}".encode()


def _traffic(rng: random.Random) -> list[Item]:
    items: list[Item] = []
    rows = phishing.events(seed=SEED)
    for i in range(N_GOOD):
        if i % 20 == 0:  # 5 % valid edge cases
            kind = EDGE_GOOD[(i // 20) % len(EDGE_GOOD)]
            value = kind.make(i, rng)
            event_id = orjson.loads(value)["id"] if value else None
        else:
            kind = Kind("good", None, lambda i, r: None)
            _, feats, _ = next(rows)
            event_id = f"g-{i}"
            value = orjson.dumps({"id": event_id, "features": feats, "ts": time.time()})
        items.append(Item(kind, _key(i, rng), value, event_id))
    for j in range(N_BAD):
        kind = HUGE if j < N_HUGE else BAD[j % len(BAD)]
        i = N_GOOD + j
        items.append(Item(kind, _key(i, rng), kind.make(i, rng)))
    rng.shuffle(items)
    return items


def _produce(setup: Setup, items: list[Item]) -> None:
    """Produce every item, keeping the (partition, offset) each one landed at."""
    producer = Producer(
        {
            "bootstrap.servers": setup.bootstrap,
            "linger.ms": 5,
            "message.max.bytes": 1_048_576,
        }
    )
    errors: list[str] = []

    def delivered(item: Item) -> Callable[[KafkaError | None, Message], None]:
        def report(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                errors.append(str(err))
                return
            item.partition, item.offset = cast(int, msg.partition()), cast(int, msg.offset())

        return report

    for item in items:
        while True:
            try:
                producer.produce(
                    setup.topics.input, item.value, item.key, on_delivery=delivered(item)
                )
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    assert producer.flush(60) == 0
    assert not errors, errors[:5]
    where = {(x.partition, x.offset) for x in items}
    assert len(where) == len(items), "the producer's delivery reports do not place every record"


def _raw(letter: dict[str, Any]) -> bytes:
    if letter["raw_encoding"] == "base64":
        return base64.b64decode(letter["raw"])
    return str(letter["raw"]).encode()


def _scrape(port: int) -> dict[str, float]:
    text = metrics_text(port)
    return {
        m[1]: float(m[2])
        for m in re.finditer(r"^(stream_infer_[a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.M)
    }


# What faust and stream-infer log when an agent or the worker crashes.
_CRASH_SIGNS = (
    "Traceback",
    "Crashed reason",  # mode: a service (an agent) crashed
    "Restarting dead",  # mode's supervisor restarting it
    "CRITICAL",  # stream-infer: cannot handle a batch / cannot start
    "the batch source failed",
)


def test_ten_thousand_bad_records_mixed_into_good_traffic(make_setup: Any) -> None:
    started = time.monotonic()
    setup: Setup = make_setup(limits={"max_event_bytes": MAX_EVENT_BYTES})
    port = setup.doc["worker"]["web_port"]
    rng = random.Random(SEED)
    items = _traffic(rng)
    good = {x.event_id: x for x in items if x.kind.reason is None}
    assert len(good) == N_GOOD and len(items) == N_GOOD + N_BAD
    worker = setup.start_worker(web_port=port)
    _produce(setup, items)
    bad = {(x.partition, x.offset): x for x in items if x.kind.reason is not None}
    assert len(bad) == N_BAD

    dead_reader = setup.consumer(setup.topics.dead_letter)
    pred_reader = setup.consumer(setup.topics.predictions)
    try:
        dead = setup.collect(setup.topics.dead_letter, until=N_BAD, consumer=dead_reader)
        preds = setup.collect(setup.topics.predictions, until=N_GOOD, consumer=pred_reader)
        # Then whatever else comes (a duplicate, a prediction for a bad record) is read too.
        time.sleep(1.0)
        dead += setup.collect(setup.topics.dead_letter, 10**9, 1.0, consumer=dead_reader)
        preds += setup.collect(setup.topics.predictions, 10**9, 1.0, consumer=pred_reader)
    finally:
        dead_reader.close()
        pred_reader.close()

    # Every bad record dead-lettered once, with its kind's reason, its bytes and its key.
    where = Counter((d["partition"], d["offset"]) for d in dead)
    assert max(where.values(), default=0) == 1, "a record dead-lettered twice"
    assert set(where) == set(bad), (
        f"{len(set(bad) - set(where))} bad records without a dead letter, "
        f"{len(set(where) - set(bad))} dead letters for records that were not bad"
    )
    wrong: Counter[tuple[str, str, str]] = Counter()
    for letter in dead:
        item = bad[(letter["partition"], letter["offset"])]
        assert item.kind.reason is not None
        if letter["error"] != item.kind.reason:
            wrong[(item.kind.name, item.kind.reason, letter["error"])] += 1
        value = item.value or b""
        kept = value[:DEAD_LETTER_RAW_PREFIX] if item.kind.reason == serde.OVERSIZED else value
        assert _raw(letter) == kept, item.kind.name
        assert letter["raw_bytes"] == len(value)
        assert letter["raw_truncated"] == (len(kept) < len(value))
        assert letter["topic"] == setup.topics.input
        if item.key is None:
            assert "key" not in letter
        else:
            assert letter["key"] == item.key.decode("utf-8", "backslashreplace")
    assert not wrong, f"(kind, expected, got): {dict(wrong)}"

    # Every good record, edge cases included, predicted exactly once.
    ids = Counter(p["id"] for p in preds)
    assert set(ids) == set(good), (
        f"{len(set(good) - set(ids))} good events without a prediction, "
        f"{len(set(ids) - set(good))} predictions for other ids"
    )
    assert max(ids.values()) == 1, "an event predicted twice"

    # The worker counted the same, and rode it out: same process, no crash, no restart.
    metrics = _scrape(port)
    expected = Counter(x.kind.reason for x in bad.values())
    for reason, n in expected.items():
        assert metrics.get(f'stream_infer_dead_letters_total{{reason="{reason}"}}') == n, reason
    assert metrics['stream_infer_predictions_total{model="risk",version="v1"}'] == N_GOOD
    assert worker.poll() is None, "the worker died:\n" + setup.worker_logs()
    assert len(setup.workers) == 1
    log_text = (setup.tmp / "worker-0.log").read_text(errors="replace")
    for sign in _CRASH_SIGNS:
        assert sign not in log_text, f"{sign!r} in the worker's log:\n{log_text[-4000:]}"
    starts = re.findall(r"replayed \d+ control commands", log_text)
    assert len(starts) == 1, "the serving runtime started twice"
    kinds = Counter(x.kind.name for x in items)
    print(
        f"\nbad input: {N_BAD} bad records of {len(BAD)} kinds ({len(expected)} reasons), "
        f"{N_GOOD} good ({len(EDGE_GOOD)} valid edge kinds, {sum(kinds[k.name] for k in EDGE_GOOD)}"
        f" records); all accounted for in {time.monotonic() - started:.1f} s"
    )


def test_dead_letters_of_records_that_escape_badly_still_fit(make_setup: Any) -> None:
    """Hardening item 6: a 200 kB record of control bytes is 1.2 MB of JSON once escaped, and a
    900 kB binary record 1.2 MB of base64: over librdkafka's message.max.bytes, so produce()
    refused the dead letter and the batch was never committed. Capped, both are delivered
    (a prefix of the payload, raw_truncated) and the input is committed to its end."""
    setup: Setup = make_setup(
        limits={"max_event_bytes": 1024 * 1024, "max_dead_letter_bytes": 64 * 1024}
    )
    port = setup.doc["worker"]["web_port"]
    control_bytes = b"\x01" * 200_000
    binary = bytes(range(256)) * 3500
    good = [
        (f"k{i}".encode(), orjson.dumps({"id": f"g-{i}", "features": [0.0] * len(FEATURES)}))
        for i in range(50)
    ]
    setup.start_worker(web_port=port)
    setup.produce([(b"bad-1", control_bytes), (b"bad-2", binary), *good])

    dead = setup.collect(setup.topics.dead_letter, until=2, timeout_s=60)
    preds = setup.collect(setup.topics.predictions, until=len(good), timeout_s=60)
    assert sorted(d["key"] for d in dead) == ["bad-1", "bad-2"]
    for letter in dead:
        original = control_bytes if letter["key"] == "bad-1" else binary
        assert letter["raw_truncated"] is True
        assert letter["raw_bytes"] == len(original)
        assert original.startswith(_raw(letter))
    assert {p["id"] for p in preds} == {f"g-{i}" for i in range(50)}
    deadline = time.monotonic() + 30
    while setup.committed(setup.topics.input) < len(good) + 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert setup.committed(setup.topics.input) == len(good) + 2
