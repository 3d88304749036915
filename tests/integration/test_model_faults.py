"""Model faults end to end: a model that raises, returns NaN or hangs on some events.

The model (tests/integration/faulty_models.py) is loaded by the worker like any state_dict
artifact. Its faults are picked by the first feature of an event.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson

from stream_infer.examples import phishing
from stream_infer.inference.store import save_state_dict
from tests.integration.conftest import assert_healthy, good_events, health, metric, wait_ready
from tests.integration.faulty_models import HANGS, NAN, RAISES, Faulty

TIMEOUT_S = 0.5
MAX_HUNG = 6


def _faulty_model(folder: Path) -> Path:
    n = len(phishing.FEATURES)
    save_state_dict(
        Faulty(n),
        folder,
        module_class="tests.integration.faulty_models:Faulty",
        module_kwargs={"n_features": n},
        features=phishing.FEATURES,
        output="probability",
    )
    return folder


def _events(kind: str, value: float, n: int) -> list[tuple[bytes | None, bytes]]:
    out: list[tuple[bytes | None, bytes]] = []
    for key, raw in good_events(n, prefix=kind):
        doc = orjson.loads(raw)
        doc["features"][phishing.FEATURES[0]] = value
        out.append((key, orjson.dumps(doc)))
    return out


def test_raising_nan_and_hanging_events_are_dead_lettered_and_the_rest_served(
    make_setup: Any, tmp_path: Path
) -> None:
    model = _faulty_model(tmp_path / "faulty" / "v1")
    setup = make_setup(
        models=[
            {"name": "risk", "serving": "v1", "versions": [{"version": "v1", "path": str(model)}]}
        ],
        limits={"inference_timeout_s": TIMEOUT_S, "max_hung_calls": MAX_HUNG},
    )
    port = setup.doc["worker"]["web_port"]
    worker = setup.start_worker(web_port=port)
    wait_ready(port)

    good = good_events(3000)
    faulty = {"raises": _events("raises", RAISES, 3), "nan": _events("nan", NAN, 3)}
    faulty["hangs"] = _events("hangs", HANGS, 2)
    mixed = list(good)
    for i, record in enumerate(r for rs in faulty.values() for r in rs):
        mixed.insert(300 * (i + 1), record)
    setup.produce(mixed)

    expected = {
        **{f"raises-{i}": "model_failed" for i in range(3)},
        **{f"nan-{i}": "model_output_invalid" for i in range(3)},
        **{f"hangs-{i}": "model_timeout" for i in range(2)},
    }
    preds = setup.collect_until_ids(setup.topics.predictions, {f"e-{i}" for i in range(3000)})
    letters = setup.collect(setup.topics.dead_letter, until=len(expected), timeout_s=30)
    assert sorted(p["id"] for p in preds) == sorted(f"e-{i}" for i in range(3000))
    got = {orjson.loads(d["raw"])["id"]: d["error"] for d in letters}
    assert got == expected
    assert all(p["version"] == "v1" for p in preds)
    hung_detail = next(d["detail"] for d in letters if d["error"] == "model_timeout")
    assert f"no answer within {TIMEOUT_S:g}s" in hung_detail

    # A hanging event costs the timeout of its batch's call and of its own retry (one, if it
    # was alone in its batch): 2 to 4 threads are still hung (they sleep for an hour). That is
    # below the cap, so the worker is healthy.
    hung = metric(port, "stream_infer_hung_inference_calls")
    assert 2 <= hung <= 4
    assert metric(port, "stream_infer_inference_timeouts_total") == hung
    assert_healthy(port)

    # More hanging events, one at a time, until the version is refused and /healthz fails.
    sent = 0
    while hung < MAX_HUNG:
        assert sent < MAX_HUNG, "every hanging event must add a hung call"
        setup.produce(_events(f"more{sent}", HANGS, 1))
        sent += 1
        deadline = time.monotonic() + 10
        while (now := metric(port, "stream_infer_hung_inference_calls")) <= hung:
            assert time.monotonic() < deadline, "a hanging event was not timed out"
            time.sleep(0.1)
        hung = now
    status, body = health(port)
    assert status == 500
    assert "risk:v1 has 6 hung model calls" in body["problems"][0]

    # Refused: good events now go to the dead-letter topic at once, and none is lost.
    setup.produce(good_events(20, prefix="late"))
    late = setup.collect(setup.topics.dead_letter, until=len(expected) + sent + 20, timeout_s=30)
    refused = [d for d in late if orjson.loads(d["raw"])["id"].startswith("late-")]
    assert len(refused) == 20
    assert all(d["error"] == "model_timeout" for d in refused)
    assert all("calls refused" in d["detail"] for d in refused)
    assert worker.poll() is None, "the worker must keep running"
