"""Pipeline.process with fake predictors: routing, shadows, and failures isolated to the rows
that cause them."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import pytest

from stream_infer.core import serde
from stream_infer.core.events import BatchResult, Record
from stream_infer.core.pipeline import ModelOutput, Pipeline, RoutingSnapshot
from stream_infer.core.routing import Route
from stream_infer.core.serde import FeatureDecoder
from stream_infer.core.watchdog import Watchdog

FEATURES = ("f0", "f1")
NOW = 1_700_000_000.0
PRED, SHADOW, DLQ = "t.predictions", "t.shadow", "t.dlq"

Fn = Callable[[npt.NDArray[np.float32]], Any]


class FakePredictor:
    """Scores with ``fn``; remembers the batch sizes it was called with."""

    def __init__(self, model: str, version: str, fn: Fn | None = None) -> None:
        self.model = model
        self.version = version
        self.fn: Fn = fn or (lambda x: x[:, 0].astype(np.float64) * 2)
        self.calls: list[int] = []

    def predict_many(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        self.calls.append(len(x))
        return self.fn(x)  # type: ignore[no-any-return]


def make_pipeline(
    outputs: Sequence[ModelOutput] = (ModelOutput("risk", PRED),), watchdog: Watchdog | None = None
) -> Pipeline:
    decoder = FeatureDecoder(FEATURES, max_event_bytes=1024)
    return Pipeline(
        decoder,
        outputs,
        dead_letter_topic=DLQ,
        shadow_topic=SHADOW,
        clock=lambda: NOW,
        watchdog=watchdog,
    )


def serving(route: Route, *predictors: FakePredictor, model: str = "risk") -> RoutingSnapshot:
    return RoutingSnapshot(
        routes={model: route}, predictors={(p.model, p.version): p for p in predictors}
    )


def events(make_record: Any, first_features: Sequence[float], prefix: str = "e") -> list[Record]:
    """One event per value: id ``e<i>``, key ``k<i>``, features [value, 0], offset i."""
    return [
        make_record(
            json.dumps({"id": f"{prefix}{i}", "features": [f, 0.0]}).encode(),
            f"k{i}".encode(),
            offset=i,
        )
        for i, f in enumerate(first_features)
    ]


def on(result: BatchResult, topic: str) -> list[tuple[bytes | None, dict[str, Any]]]:
    return [(r.key, orjson.loads(r.value)) for r in result.records if r.topic == topic]


def test_predictions_go_to_the_model_topic_keyed_and_stamped(make_record: Any) -> None:
    records = events(make_record, [1.0, 2.5, -3.0])
    records.append(make_record(b'{"id": "nokey", "features": [4, 0], "ts": 12.5}', None))
    predictor = FakePredictor("risk", "v1")

    result = make_pipeline().process(records, serving(Route.single("v1"), predictor))

    assert on(result, PRED) == [
        (
            b"k0",
            {"id": "e0", "prediction": 2.0, "model": "risk", "version": "v1", "served_at": NOW},
        ),
        (
            b"k1",
            {"id": "e1", "prediction": 5.0, "model": "risk", "version": "v1", "served_at": NOW},
        ),
        (
            b"k2",
            {"id": "e2", "prediction": -6.0, "model": "risk", "version": "v1", "served_at": NOW},
        ),
        (
            b"nokey",
            {
                "id": "nokey",
                "prediction": 8.0,
                "model": "risk",
                "version": "v1",
                "served_at": NOW,
                "ts": 12.5,
            },
        ),
    ]
    assert len(result.records) == 4
    assert predictor.calls == [4]  # one call for the whole batch
    assert result.n_in == 4
    assert result.served == {("risk", "v1"): 4}
    assert result.shadowed == {}
    assert result.dead_letters == []
    assert result.inference_s >= 0.0


def test_several_outputs_are_predicted_on_their_own_topics(make_record: Any) -> None:
    pipeline = make_pipeline([ModelOutput("risk", PRED), ModelOutput("churn", "t.churn")])
    risk = FakePredictor("risk", "v1")
    churn = FakePredictor("churn", "c3", lambda x: np.full(len(x), 0.25))
    state = RoutingSnapshot(
        routes={"risk": Route.single("v1"), "churn": Route.single("c3")},
        predictors={("risk", "v1"): risk, ("churn", "c3"): churn},
    )

    result = pipeline.process(events(make_record, [1.0, 2.0]), state)

    assert [d["prediction"] for _, d in on(result, PRED)] == [2.0, 4.0]
    assert [(d["model"], d["version"], d["prediction"]) for _, d in on(result, "t.churn")] == [
        ("churn", "c3", 0.25),
        ("churn", "c3", 0.25),
    ]
    assert result.served == {("risk", "v1"): 2, ("churn", "c3"): 2}


def test_a_split_sends_each_row_to_its_version(make_record: Any) -> None:
    records = events(make_record, [float(i) for i in range(200)])
    route = Route.split({"v1": 0.5, "v2": 0.5}, order=["v1", "v2"])
    v1 = FakePredictor("risk", "v1", lambda x: np.full(len(x), 0.1))
    v2 = FakePredictor("risk", "v2", lambda x: np.full(len(x), 0.2))

    result = make_pipeline().process(records, serving(route, v1, v2))

    keys = [r.key() for r in records]
    expected = {keys[row]: version for version, rows in route.assign(keys) for row in rows}
    got = on(result, PRED)
    assert sorted(key for key, _ in got) == sorted(keys)
    for key, doc in got:
        assert doc["version"] == expected[key]
        assert doc["prediction"] == {"v1": 0.1, "v2": 0.2}[doc["version"]]
        assert doc["id"] == "e" + key.decode()[1:]
    n_v1 = sum(v == "v1" for v in expected.values())
    assert 0 < n_v1 < 200
    assert v1.calls == [n_v1]
    assert v2.calls == [200 - n_v1]
    assert result.served == {("risk", "v1"): n_v1, ("risk", "v2"): 200 - n_v1}


def test_a_shadow_scores_every_good_event_without_touching_predictions(
    make_record: Any,
) -> None:
    records = events(make_record, [1.0, 2.0, 3.0])
    records.insert(1, make_record(b"not json", b"kbad"))
    v1 = FakePredictor("risk", "v1")
    v2 = FakePredictor("risk", "v2", lambda x: x[:, 0].astype(np.float64) * 100)

    plain = make_pipeline().process(records, serving(Route.single("v1"), v1))
    shadowed = make_pipeline().process(
        records, serving(Route.single("v1").with_shadow("v2"), v1, v2)
    )

    assert on(shadowed, PRED) == on(plain, PRED)
    assert on(shadowed, DLQ) == on(plain, DLQ)
    assert [(k, d["version"], d["prediction"]) for k, d in on(shadowed, SHADOW)] == [
        (b"k0", "v2", 100.0),
        (b"k1", "v2", 200.0),
        (b"k2", "v2", 300.0),
    ]
    assert shadowed.served == {("risk", "v1"): 3}
    assert shadowed.shadowed == {("risk", "v2"): 3}


def test_a_failing_shadow_costs_nothing(make_record: Any) -> None:
    def explode(x: npt.NDArray[np.float32]) -> Any:
        raise RuntimeError("shadow is broken")

    v1 = FakePredictor("risk", "v1")
    broken = FakePredictor("risk", "v2", explode)
    result = make_pipeline().process(
        events(make_record, [1.0, 2.0]), serving(Route.single("v1").with_shadow("v2"), v1, broken)
    )
    assert len(on(result, PRED)) == 2
    assert on(result, SHADOW) == []
    assert result.dead_letters == []
    assert result.shadowed == {}


def test_no_shadow_topic_means_no_shadow(make_record: Any) -> None:
    decoder = FeatureDecoder(FEATURES, max_event_bytes=1024)
    pipeline = Pipeline(
        decoder, [ModelOutput("risk", PRED)], dead_letter_topic=DLQ, shadow_topic=None
    )
    v2 = FakePredictor("risk", "v2")
    result = pipeline.process(
        events(make_record, [1.0]),
        serving(Route.single("v1").with_shadow("v2"), FakePredictor("risk", "v1"), v2),
    )
    assert {r.topic for r in result.records} == {PRED}
    assert v2.calls == []


def test_rows_that_make_the_model_raise_are_isolated(make_record: Any) -> None:
    values = [float(i) for i in range(100, 140)]
    values[5] = values[20] = 13.0

    def fragile(x: npt.NDArray[np.float32]) -> Any:
        if (x[:, 0] == 13).any():
            raise ValueError("thirteen is unlucky")
        return x[:, 0].astype(np.float64) * 2

    records = events(make_record, values)
    predictor = FakePredictor("risk", "v1", fragile)

    result = make_pipeline().process(records, serving(Route.single("v1"), predictor))

    assert [(d.reason, d.record) for d in result.dead_letters] == [
        (serde.MODEL_FAILED, records[5]),
        (serde.MODEL_FAILED, records[20]),
    ]
    assert all("ValueError: thirteen is unlucky" in d.detail for d in result.dead_letters)
    served = on(result, PRED)
    assert [d["id"] for _, d in served] == [f"e{i}" for i in range(40) if i not in (5, 20)]
    assert all(d["prediction"] == values[int(d["id"][1:])] * 2 for _, d in served)
    dlq = on(result, DLQ)
    assert [(k, d["error"], d["offset"]) for k, d in dlq] == [
        (b"k5", "model_failed", 5),
        (b"k20", "model_failed", 20),
    ]
    assert result.served == {("risk", "v1"): 38}
    assert len(predictor.calls) < 40  # bisection, not one call per row


def test_non_finite_outputs_are_dead_lettered(make_record: Any) -> None:
    def shaky(x: npt.NDArray[np.float32]) -> Any:
        out = x[:, 0].astype(np.float64)
        out[x[:, 0] == 7] = np.nan
        out[x[:, 0] == 8] = np.inf
        return out

    records = events(make_record, [1.0, 7.0, 2.0, 8.0, 3.0])
    result = make_pipeline().process(
        records, serving(Route.single("v1"), FakePredictor("risk", "v1", shaky))
    )

    assert [(d.reason, d.record) for d in result.dead_letters] == [
        (serde.MODEL_OUTPUT_INVALID, records[1]),
        (serde.MODEL_OUTPUT_INVALID, records[3]),
    ]
    assert [d["prediction"] for _, d in on(result, PRED)] == [1.0, 2.0, 3.0]
    assert result.served == {("risk", "v1"): 3}


def test_a_non_finite_value_in_one_of_several_outputs_fails_its_row(make_record: Any) -> None:
    def two_outputs(x: npt.NDArray[np.float32]) -> Any:
        out = np.stack([x[:, 0], x[:, 0] + 1], axis=1).astype(np.float64)
        out[x[:, 0] == 2, 1] = np.nan
        return out

    records = events(make_record, [1.0, 2.0, 3.0])
    result = make_pipeline().process(
        records, serving(Route.single("v1"), FakePredictor("risk", "v1", two_outputs))
    )
    assert [d.record for d in result.dead_letters] == [records[1]]
    assert [d["prediction"] for _, d in on(result, PRED)] == [[1.0, 2.0], [3.0, 4.0]]


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: np.zeros(len(x) - 1),
        lambda x: np.zeros(len(x) + 1),
        lambda x: np.zeros((len(x), 1, 2)),
        lambda x: np.float64(0.5),
    ],
    ids=["too few", "too many", "3-d", "scalar"],
)
def test_an_output_of_the_wrong_shape_dead_letters_every_row(make_record: Any, fn: Fn) -> None:
    records = events(make_record, [1.0, 2.0, 3.0])
    result = make_pipeline().process(
        records, serving(Route.single("v1"), FakePredictor("risk", "v1", fn))
    )
    assert [(d.reason, d.record) for d in result.dead_letters] == [
        (serde.MODEL_OUTPUT_INVALID, r) for r in records
    ]
    assert all("returned shape" in d.detail for d in result.dead_letters)
    assert on(result, PRED) == []
    assert result.served == {}


def test_decode_failures_go_to_the_dead_letter_topic(make_record: Any) -> None:
    records = [
        make_record(b'{"id": "ok", "features": [1, 2]}', b"k-ok", offset=10),
        make_record(b"\xff\xfe", b"k-junk", offset=11),
        make_record(b'{"id": "short", "features": [1]}', None, offset=12),
        make_record(None, b"k-tomb", offset=13),
    ]
    predictor = FakePredictor("risk", "v1")

    result = make_pipeline().process(records, serving(Route.single("v1"), predictor))

    assert [(k, d["error"], d["offset"], d["ts"]) for k, d in on(result, DLQ)] == [
        (b"k-junk", "invalid_json", 11, NOW),
        (None, "wrong_feature_count", 12, NOW),
        (b"k-tomb", "empty", 13, NOW),
    ]
    assert [d["id"] for _, d in on(result, PRED)] == ["ok"]
    assert predictor.calls == [1]
    assert result.n_in == 4
    assert result.served == {("risk", "v1"): 1}


def test_a_batch_with_nothing_good_calls_no_model(make_record: Any) -> None:
    predictor = FakePredictor("risk", "v1")
    pipeline = make_pipeline()
    state = serving(Route.single("v1"), predictor)

    bad = pipeline.process([make_record(b"[]"), make_record(b"")], state)
    empty = pipeline.process([], state)

    assert predictor.calls == []
    assert (bad.n_in, len(bad.dead_letters), bad.served) == (2, 2, {})
    assert (empty.n_in, empty.records, empty.dead_letters) == (0, [], [])


def test_the_first_model_to_fail_an_event_names_the_reason(make_record: Any) -> None:
    def raises(x: npt.NDArray[np.float32]) -> Any:
        raise RuntimeError("down")

    def nan(x: npt.NDArray[np.float32]) -> Any:
        return np.full(len(x), np.nan)

    pipeline = make_pipeline([ModelOutput("a", "t.a"), ModelOutput("b", "t.b")])
    state = RoutingSnapshot(
        routes={"a": Route.single("v1"), "b": Route.single("v1")},
        predictors={
            ("a", "v1"): FakePredictor("a", "v1", raises),
            ("b", "v1"): FakePredictor("b", "v1", nan),
        },
    )
    records = events(make_record, [1.0])
    result = pipeline.process(records, state)
    assert [(d.reason, d.record) for d in result.dead_letters] == [(serde.MODEL_FAILED, records[0])]


def hangs_on_13(release: threading.Event) -> Fn:
    """A model that blocks (until ``release``) on any batch holding the value 13."""

    def model(x: npt.NDArray[np.float32]) -> Any:
        if (x[:, 0] == 13).any():
            release.wait()
        return x[:, 0].astype(np.float64) * 2

    return model


def test_rows_that_make_the_model_hang_are_dead_lettered_and_the_rest_served(
    make_record: Any,
) -> None:
    values = [float(i) for i in range(100, 120)]
    values[4] = 13.0
    release = threading.Event()
    predictor = FakePredictor("risk", "v1", hangs_on_13(release))
    records = events(make_record, values)
    try:
        result = make_pipeline(watchdog=Watchdog(0.1)).process(
            records, serving(Route.single("v1"), predictor)
        )
    finally:
        release.set()

    assert [(d.reason, d.record) for d in result.dead_letters] == [
        (serde.MODEL_TIMEOUT, records[4])
    ]
    assert "InferenceTimeout" in result.dead_letters[0].detail
    assert "no answer within 0.1s" in result.dead_letters[0].detail
    served = on(result, PRED)
    assert [d["id"] for _, d in served] == [f"e{i}" for i in range(20) if i != 4]
    assert all(d["prediction"] == values[int(d["id"][1:])] * 2 for _, d in served)
    # One batch call that hung, then one call per row: a hang costs one timeout, not one per
    # level of a bisection.
    assert predictor.calls == [20] + [1] * 20


def test_a_version_refused_for_hung_calls_dead_letters_at_once(make_record: Any) -> None:
    release = threading.Event()
    predictor = FakePredictor("risk", "v1", hangs_on_13(release))
    pipeline = make_pipeline(watchdog=Watchdog(0.1, max_hung=2))
    state = serving(Route.single("v1"), predictor)
    try:
        # The batch call hangs, then the retry of row 1 alone: two hung calls, the cap.
        first = pipeline.process(events(make_record, [1.0, 13.0, 2.0]), state)
        later = pipeline.process(events(make_record, [3.0, 4.0], prefix="x"), state)
    finally:
        release.set()

    assert [d.reason for d in first.dead_letters] == [serde.MODEL_TIMEOUT] * 2
    assert [d["id"] for _, d in on(first, PRED)] == ["e0"]
    assert "earlier calls are still hung" in first.dead_letters[1].detail
    assert [d.reason for d in later.dead_letters] == [serde.MODEL_TIMEOUT] * 2
    assert on(later, PRED) == []
    assert predictor.calls == [3, 1, 1]  # nothing more was even tried
