"""A backtest: a candidate and an incumbent version scored on the same replayed events, and
judged on the labels that join them, as the online learner judges what was served.

Pure: no Kafka, no faust, no torch. The replay (:mod:`stream_infer.io.replay`) reads the
records, the command (``stream-infer backtest``) decodes them and runs both versions; this
module gets each batch's valid events with both versions' probabilities, and the decoded labels,
in any order, and keeps:

* the join: a :class:`~stream_infer.online.joiner.LabelJoiner` (the online learner's), events
  and labels meeting in either order; nothing expires (a replay has a known end), the bound is
  ``max_pending`` events and as many early labels, the oldest evicted and counted;
* per version a :class:`~stream_infer.online.prequential.Prequential` over every joined label
  (accuracy, log loss, ROC AUC, and the rolling ones over the last ``metrics_window`` labels),
  and one per event-time window of ``window_s`` seconds (the series the plot draws: tumbling
  windows by the event record's timestamp, so the series does not depend on the order in which
  partitions were read);
* over every valid event, labelled or not: the agreement of the two decisions
  (``p > threshold``; 0.5 is Prequential's decision) and the score differences
  ``candidate - incumbent`` (kept whole, 8 bytes an event, for exact quantiles);
* counts: events and labels read, invalid ones by reason (not scored), labels that are not 0/1,
  joins, events left without a label, labels left without their event, duplicates.

A candidate that is right where the incumbent is wrong:

>>> import numpy as np
>>> bt = Backtest("risk", candidate="v2", incumbent="v1", start_s=0.0, window_s=60.0)
>>> x = np.zeros((3, 1), np.float32)
>>> bt.scored_many(["a", "b", "c"], x, [1.0, 2.0, 61.0], [0.9, 0.2, 0.8], [0.4, 0.3, 0.7])
>>> bt.labels_many([("a", 1.0), ("b", 0.0), ("z", 1.0)])
>>> r = bt.report()
>>> r["metrics"]["v2"]["accuracy"], r["metrics"]["v1"]["accuracy"], r["agreement"]["rate"]
(1.0, 0.5, 0.6666666666666666)
>>> r["counts"]["joined"], r["counts"]["unlabeled_events"], r["counts"]["labels_without_event"]
(2, 1, 1)
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from stream_infer.online.joiner import Joined, LabelJoiner, Served
from stream_infer.online.prequential import Prequential

QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
MODEL_OUTPUT_INVALID = "model_output_invalid"  # serde's reason: a score that is no probability


class Backtest:
    """Both versions' scores of the same events, joined with their labels, and the report.

    Parameters
    ----------
    model, candidate, incumbent
        The model and the two versions compared (their names go into the report).
    start_s, window_s
        Where the replay starts (epoch seconds) and the width of the event-time windows of the
        series (seconds).
    threshold
        The decision threshold of the agreement rate: a version decides 1 when ``p > threshold``.
    max_pending
        The most events waiting for a label, and separately the most labels waiting for their
        event (the joiner's ``max_entries``).
    metrics_window
        The number of most recent labels the rolling metrics of the whole run cover.
    """

    def __init__(
        self,
        model: str,
        *,
        candidate: str,
        incumbent: str,
        start_s: float,
        window_s: float,
        threshold: float = 0.5,
        max_pending: int = 1_000_000,
        metrics_window: int = 1000,
    ) -> None:
        if candidate == incumbent:
            msg = f"Backtest: the candidate and the incumbent are the same version {candidate!r}"
            raise ValueError(msg)
        if not (math.isfinite(window_s) and window_s > 0):
            msg = f"Backtest: window_s must be a finite number > 0, got {window_s!r}"
            raise ValueError(msg)
        if not math.isfinite(start_s):
            msg = f"Backtest: start_s must be finite, got {start_s!r}"
            raise ValueError(msg)
        if not 0.0 <= threshold < 1.0:
            msg = f"Backtest: threshold must be in [0, 1), got {threshold!r}"
            raise ValueError(msg)
        self.model = model
        self.candidate = candidate
        self.incumbent = incumbent
        self.start_s = float(start_s)
        self.window_s = float(window_s)
        self.threshold = float(threshold)
        self.max_pending = max_pending
        self.metrics_window = metrics_window
        # No expiry: the clock stands still and expire() is never called; the bound is the size.
        self._joiner = LabelJoiner(ttl_s=1.0, max_entries=max_pending, clock=lambda: 0.0)
        self._overall = {v: Prequential(metrics_window) for v in (candidate, incumbent)}
        self._windows: dict[int, dict[str, Prequential]] = {}
        self._diffs: list[npt.NDArray[np.float64]] = []
        self._agree = 0
        self._scored = 0
        self._events = 0
        self._labels = 0
        self._invalid: Counter[str] = Counter()
        self._invalid_labels = 0
        self._non_binary = 0

    # -- input -------------------------------------------------------------------------------

    def invalid_many(self, reasons: Iterable[str]) -> None:
        """Events read that did not decode (one reason each): counted, never scored."""
        for reason in reasons:
            self._invalid[reason] += 1
            self._events += 1

    def invalid_labels(self, n: int) -> None:
        """Records of the labels topic that are not labels."""
        self._invalid_labels += n
        self._labels += n

    def scored_many(
        self,
        ids: Sequence[str],
        x: npt.NDArray[Any],
        ts_s: Sequence[float],
        candidate: npt.ArrayLike,
        incumbent: npt.ArrayLike,
    ) -> None:
        """Valid events (``x[i]`` the features of ``ids[i]``, ``ts_s[i]`` its record's time in
        epoch seconds) and each version's probability for them. An event a version scored
        outside ``[0, 1]`` (or NaN) is counted invalid (``model_output_invalid``), not scored."""
        n = len(ids)
        cand = np.asarray(candidate, dtype=np.float64).reshape(-1)
        inc = np.asarray(incumbent, dtype=np.float64).reshape(-1)
        if cand.shape != (n,) or inc.shape != (n,) or len(ts_s) != n or x.shape[0] != n:
            msg = (
                f"Backtest.scored_many: {n} ids, {len(ts_s)} times, features {x.shape}, "
                f"scores {cand.shape} and {inc.shape}: one of each per id expected"
            )
            raise ValueError(msg)
        ok = (cand >= 0.0) & (cand <= 1.0) & (inc >= 0.0) & (inc <= 1.0)  # NaN fails both
        if not ok.all():
            bad = int((~ok).sum())
            self._invalid[MODEL_OUTPUT_INVALID] += bad
            self._events += bad
            keep = np.flatnonzero(ok)
            ids = [ids[i] for i in keep.tolist()]
            ts_s = [ts_s[i] for i in keep.tolist()]
            x, cand, inc = x[keep], cand[keep], inc[keep]
        if not ids:
            return
        self._events += len(ids)
        self._scored += len(ids)
        self._agree += int(((cand > self.threshold) == (inc > self.threshold)).sum())
        self._diffs.append(cand - inc)
        served = [
            Served(i, self.model, self.candidate, p, t)
            for i, p, t in zip(ids, cand.tolist(), ts_s, strict=True)
        ] + [
            Served(i, self.model, self.incumbent, p, t)
            for i, p, t in zip(ids, inc.tolist(), ts_s, strict=True)
        ]
        self._score(self._joiner.add_event_many(ids, x, served))

    def labels_many(self, labels: Iterable[tuple[str, float]]) -> None:
        """Decoded labels ``(event id, label)``; a label that is not 0/1 is counted, not
        joined (the metrics are a binary classifier's)."""
        joined: list[Joined] = []
        for event_id, label in labels:
            self._labels += 1
            if label not in (0.0, 1.0):
                self._non_binary += 1
                continue
            match = self._joiner.add_label_one(event_id, label)
            if match is not None:
                joined.append(match)
        self._score(joined)

    def _score(self, joined: Iterable[Joined]) -> None:
        for item in joined:
            for s in item.served:
                self._overall[s.version].update_one(item.label, s.prediction)
                self._window(s.ts)[s.version].update_one(item.label, s.prediction)

    def _window(self, ts_s: float) -> dict[str, Prequential]:
        index = math.floor((ts_s - self.start_s) / self.window_s)
        window = self._windows.get(index)
        if window is None:
            window = self._windows[index] = {
                v: Prequential(self.metrics_window) for v in (self.candidate, self.incumbent)
            }
        return window

    # -- output ------------------------------------------------------------------------------

    @property
    def events(self) -> int:
        """Events read so far (valid and invalid)."""
        return self._events

    @property
    def labels(self) -> int:
        """Label records read so far (valid and invalid)."""
        return self._labels

    def report(self) -> dict[str, Any]:
        """The report as a JSON-ready dict: ``counts``, ``metrics`` per version (Prequential's
        report), ``difference`` (candidate minus incumbent, per metric), ``agreement``,
        ``score_difference`` (candidate minus incumbent: mean, quantiles) and ``windows``
        (the per-window metrics, oldest first)."""
        joiner = self._joiner
        metrics = {v: p.report() for v, p in self._overall.items()}
        diffs = np.concatenate(self._diffs) if self._diffs else np.zeros(0)
        score_difference: dict[str, Any] = {"n": int(diffs.size)}
        if diffs.size:
            score_difference |= {
                "mean": float(diffs.mean()),
                "mean_abs": float(np.abs(diffs).mean()),
                "quantiles": {
                    f"{q:g}": float(v)
                    for q, v in zip(QUANTILES, np.quantile(diffs, QUANTILES), strict=True)
                },
            }
        series = []
        for index in sorted(self._windows):
            window = self._windows[index]
            series.append(
                {"start_s": self.start_s + index * self.window_s}
                | {v: _short(p.report()) for v, p in window.items()}
            )
        return {
            "model": self.model,
            "candidate": self.candidate,
            "incumbent": self.incumbent,
            "counts": {
                "events": self._events,
                "scored_events": self._scored,
                "invalid_events": sum(self._invalid.values()),
                "invalid_by_reason": dict(sorted(self._invalid.items())),
                "labels": self._labels,
                "invalid_labels": self._invalid_labels,
                "non_binary_labels": self._non_binary,
                "joined": joiner.joined,
                # Waiting at the end; with evictions (the joiner counts events and early labels
                # together) some more of either were given up on.
                "unlabeled_events": joiner.pending,
                "labels_without_event": joiner.early,
                "duplicate_labels": joiner.duplicate_labels,
                "duplicate_events": joiner.duplicate_events,
                "evicted": joiner.evicted,
            },
            "metrics": metrics,
            "difference": {
                name: metrics[self.candidate][name] - metrics[self.incumbent][name]
                for name in ("log_loss", "accuracy", "roc_auc")
            },
            "agreement": {
                "threshold": self.threshold,
                "n": self._scored,
                "rate": self._agree / self._scored if self._scored else None,
            },
            "score_difference": score_difference,
            "windows": {"window_s": self.window_s, "series": series},
        }


def _short(report: dict[str, float]) -> dict[str, float]:
    return {k: report[k] for k in ("n", "accuracy", "log_loss", "roc_auc")}
