"""Learner throughput: labels/s through join + prequential test + learn, in one thread.

    .venv/bin/python -m bench.learner [--repeat 16]

The Phishing dataset (1,250 rows) repeated; every event is registered with the joiner as
served by one version, then every label is joined, scored test-then-train by the online
learner and learned. This is the per-label work of the worker's learning thread.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from stream_infer.examples import phishing
from stream_infer.online import LEARNER_KINDS, LearnerKind
from stream_infer.online.joiner import LabelJoiner, Served
from stream_infer.online.learner import OnlineLearner
from stream_infer.online.prequential import Prequential


def measure(kind: LearnerKind, repeat: int) -> dict[str, float]:
    x, y = phishing.load_dataset()
    xs, ys = np.tile(x, (repeat, 1)), np.tile(y, repeat)
    ids = [f"e{i}" for i in range(len(xs))]
    learner = OnlineLearner("risk", "online", phishing.FEATURES, kind=kind)
    joiner, preq = LabelJoiner(3600, 10**7), Prequential()
    started = time.perf_counter()
    for s in range(0, len(xs), 512):
        part = ids[s : s + 512]
        joiner.add_event_many(
            part, xs[s : s + 512], [Served(i, "risk", "v1", 0.5, 0.0) for i in part]
        )
    joined_at = time.perf_counter()
    for event_id, label in zip(ids, ys.tolist(), strict=True):
        item = joiner.add_label_one(event_id, label)
        assert item is not None
        row = dict(zip(phishing.FEATURES, item.features, strict=True))
        preq.update_one(item.label, learner.predict_proba_one(row))
        learner.learn_one(row, item.label >= 0.5)
    done = time.perf_counter()
    return {
        "events_per_s": len(xs) / (joined_at - started),
        "labels_per_s": len(xs) / (done - joined_at),
        "accuracy": preq.report()["accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=16)
    args = parser.parse_args()
    for kind in LEARNER_KINDS:
        r = measure(kind, args.repeat)
        print(
            f"{kind:20s} events registered {r['events_per_s']:>9,.0f}/s   "
            f"labels joined+tested+learned {r['labels_per_s']:>8,.0f}/s   "
            f"prequential accuracy {r['accuracy']:.3f}"
        )


if __name__ == "__main__":
    main()
