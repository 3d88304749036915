"""The Grafana dashboard (deploy/grafana/dashboards/stream-infer.json): it parses, every metric
name in its PromQL is one that a worker exposes (stream_infer.observability: Metrics, plus
LearningMetrics for online learning, read from the registry: a renamed or misspelled metric
fails here), every one of those is on it, and the histograms are shown as quantiles with
histogram_quantile.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

from tests.deploy.promql import (
    dashboard_metric_names,
    dashboard_queries,
    exposed_series,
    metric_names,
    unknown_metric_names,
    worker_registry,
)


def test_dashboard_uses_only_metrics_that_exist(dashboard: dict[str, Any]) -> None:
    assert len(dashboard_queries(dashboard)) >= 20
    unknown = unknown_metric_names(dashboard)
    assert not unknown, f"no worker exports these metrics: {sorted(unknown)}"


def test_dashboard_shows_every_metric(dashboard: dict[str, Any]) -> None:
    series = exposed_series()
    shown = {series[name] for name in dashboard_metric_names(dashboard) if name in series}
    missing = set(series.values()) - shown
    assert not missing, f"metrics a worker exports that are not shown: {sorted(missing)}"


def test_dashboard_histograms_have_quantiles(dashboard: dict[str, Any]) -> None:
    histograms = {f.name for f in worker_registry().collect() if f.type == "histogram"}
    queries = dashboard_queries(dashboard)
    for name in histograms:
        assert any(
            re.search(rf"histogram_quantile\(.*\bby \(le\b.*\b{name}_bucket\b", q) for q in queries
        ), name


def test_dashboard_panels(dashboard: dict[str, Any]) -> None:
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert "datasource" in variables
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            for variable in re.findall(r"\$(\w+)", target["expr"]):
                assert variable in variables or variable.startswith("__"), variable


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("rate(stream_infer_events_in_total[5m])", {"stream_infer_events_in_total"}),
        (
            'histogram_quantile(0.99, sum by (le) (rate(x_bucket{a="b", c=~"$d"}[$__range])))',
            {"x_bucket"},
        ),
        ("sum(a) / sum without (le) (b offset 5m) * 1e3", {"a", "b"}),
        ("up == bool 1", {"up"}),
        ('label_replace(c, "dst", "$1", "src", "(.*)")', {"c"}),
    ],
)
def test_metric_names_of_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_an_unknown_metric_fails_the_check(dashboard: dict[str, Any]) -> None:
    bad = copy.deepcopy(dashboard)
    target = next(p for p in bad["panels"] if p["type"] != "row")["targets"][0]
    target["expr"] = "sum(rate(stream_infer_events_total[5m])) + up"
    assert unknown_metric_names(bad) == {"stream_infer_events_total", "up"}
