"""The metric names a Grafana dashboard's PromQL uses, and the ones a worker exposes."""

from __future__ import annotations

import re
from typing import Any

from prometheus_client import CollectorRegistry

from stream_infer.observability import LearningMetrics, Metrics, RolloutMetrics

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or"}
_KEYWORDS |= {"unless", "offset", "inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels or keywords)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = re.findall(r"(?<![\w$.:])([A-Za-z_:][\w:]*)\b(?!\s*\()", text)
    return {n for n in names if n.lower() not in _KEYWORDS}


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of a dashboard: panel targets (rows included) and the query
    variables (``label_values(metric, label)`` contributes its metric)."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                found.append(node["expr"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(dashboard.get("panels", []))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable["query"]
        query = query.get("query", "") if isinstance(query, dict) else query
        label_values = re.fullmatch(r"\s*label_values\((?:(.+),)?\s*\w+\s*\)\s*", query)
        if label_values:
            if label_values.group(1):
                found.append(label_values.group(1))
        else:
            found.append(re.sub(r"^\s*query_result\((.*)\)\s*$", r"\1", query))
    return found


def dashboard_metric_names(dashboard: dict[str, Any]) -> set[str]:
    return set().union(*(metric_names(q) for q in dashboard_queries(dashboard)))


def worker_registry() -> CollectorRegistry:
    """The registry a worker serves on /metrics, with every metric it can register (all defined
    in stream_infer.observability): the serving metrics (Metrics) and, when the topology
    enables online learning, the learning metrics (LearningMetrics) and the rollout metrics
    (RolloutMetrics)."""
    metrics = Metrics()
    LearningMetrics(metrics)
    RolloutMetrics(metrics)
    return metrics.registry


def exposed_series() -> dict[str, str]:
    """Every series name a worker's /metrics can show, mapped to its metric family."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
        "info": ("_info",),
    }
    series = {}
    for family in worker_registry().collect():
        for suffix in suffixes[family.type]:
            series[family.name + suffix] = family.name
    return series


def unknown_metric_names(dashboard: dict[str, Any]) -> set[str]:
    return dashboard_metric_names(dashboard) - exposed_series().keys()
