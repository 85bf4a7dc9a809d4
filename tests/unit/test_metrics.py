"""The metric definitions follow Prometheus' conventions with bounded labels, the runner classifies
upstream calls into a closed set of outcomes, and the Grafana dashboard and the alert rules in
deploy/ use only metrics and labels that exist."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from imagegate.app.metrics import BACKLOG_SPECS, SPECS, UPSTREAM_OUTCOMES, Metrics
from imagegate.workers import http
from imagegate.workers.adapters.base import UpstreamError, error_for_status
from imagegate.workers.task_metrics import metered_call

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
# Labels that would make a series per task, key, prompt or path: never allowed.
UNBOUNDED_LABELS = {"id", "task_id", "batch_id", "event_id", "api_key", "api_key_id", "key", "prompt", "path", "url"}


def exported() -> dict[str, set[str]]:
    """Every series name imagegate exports, with the labels it carries."""
    names: dict[str, set[str]] = {}
    for spec in [*SPECS.values(), *BACKLOG_SPECS.values()]:
        labels = set(spec.labels)
        if spec.kind is Histogram:
            names |= {spec.name + suffix: labels for suffix in ("_count", "_sum")}
            names[spec.name + "_bucket"] = labels | {"le"}
        else:
            names[spec.name] = labels
    return names


def test_names_and_labels_follow_prometheus_conventions():
    for spec in [*SPECS.values(), *BACKLOG_SPECS.values()]:
        assert re.fullmatch(r"imagegate_[a-z_]+", spec.name), spec.name
        assert spec.name.endswith("_total") == (spec.kind is Counter), spec.name
        if spec.kind is Histogram:
            assert spec.name.endswith("_seconds") and spec.buckets, spec.name
        assert not set(spec.labels) & UNBOUNDED_LABELS, spec.name
    assert set(SPECS) == set(typing.get_type_hints(Metrics)), "one Metrics attribute per spec"
    built = Metrics(CollectorRegistry())
    assert all(getattr(built, attribute) is not None for attribute in SPECS)


def reply(status: int | None = None, error: Exception | None = None):
    def handler(request: httpx.Request) -> httpx.Response:
        if error:
            raise error
        return httpx.Response(status, json={"data": []})

    return httpx.Client(transport=httpx.MockTransport(handler))


@pytest.mark.parametrize(
    "client, outcome",
    [
        (reply(error=httpx.ConnectError("refused")), "connection_error"),
        (reply(error=httpx.ReadTimeout("slow")), "timeout"),
    ],
)
def test_an_upstream_call_that_gets_no_reply_is_counted_by_what_kept_it(client, outcome):
    labels = {"model": "unit-model", "kind": "generate", "outcome": outcome}
    before = REGISTRY.get_sample_value("imagegate_upstream_calls_total", labels) or 0
    with pytest.raises(UpstreamError):
        metered_call("unit-model", "generate", lambda: http.request(client, "POST", "http://upstream/x", deadline_s=1))
    assert REGISTRY.get_sample_value("imagegate_upstream_calls_total", labels) == before + 1


def test_an_upstream_reply_is_counted_by_its_status_class_and_timed():
    labels = {"model": "unit-model", "kind": "poll"}
    before = {
        outcome: REGISTRY.get_sample_value("imagegate_upstream_calls_total", labels | {"outcome": outcome}) or 0
        for outcome in ("2xx", "5xx")
    }
    timed = REGISTRY.get_sample_value("imagegate_upstream_call_duration_seconds_count", labels) or 0

    def fails():
        raise error_for_status(503, "busy")

    with pytest.raises(UpstreamError):
        metered_call("unit-model", "poll", fails)
    assert metered_call("unit-model", "poll", lambda: None) is None  # a pending poll: a 2xx reply
    assert REGISTRY.get_sample_value("imagegate_upstream_calls_total", labels | {"outcome": "5xx"}) == before["5xx"] + 1
    assert REGISTRY.get_sample_value("imagegate_upstream_calls_total", labels | {"outcome": "2xx"}) == before["2xx"] + 1
    assert REGISTRY.get_sample_value("imagegate_upstream_call_duration_seconds_count", labels) == timed + 2
    outcomes = {labels["outcome"] for name, labels in _samples("imagegate_upstream_calls_total")}
    assert outcomes <= set(UPSTREAM_OUTCOMES)


def _samples(name: str) -> list[tuple[str, dict]]:
    return [(s.name, s.labels) for family in REGISTRY.collect() for s in family.samples if s.name == name]


# -- deploy/: the dashboard and the alert rules --------------------------------------------------
SELECTOR = re.compile(r"\b(imagegate_[a-z_]+|up)\s*(\{[^}]*\})?")
MATCHER = re.compile(r'\s*([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"[^"]*"\s*')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
TARGET_LABELS = frozenset({"job", "instance"})  # added by Prometheus to every series it scrapes


def check_expression(expr: str) -> None:
    """A PromQL sanity check: balanced brackets, every imagegate_ series exists, and every label
    matched or grouped by is one those series carry."""
    names = exported()
    for opening, closing in ("()", "{}", "[]"):
        assert expr.count(opening) == expr.count(closing), f"unbalanced {opening}{closing} in {expr}"
    used = [(match.group(1), match.group(2)) for match in SELECTOR.finditer(expr)]
    assert any(name != "up" for name, _ in used) or "up{" in expr, f"no imagegate metric in {expr}"
    carried = set(TARGET_LABELS)
    for name, selector in used:
        labels = set(TARGET_LABELS) if name == "up" else names.get(name)
        assert labels is not None, f"{name} is not defined in app/metrics.py (in {expr})"
        labels |= TARGET_LABELS
        carried |= labels
        for matcher in filter(str.strip, (selector or "{}")[1:-1].split(",")):
            label = MATCHER.fullmatch(matcher)
            assert label and label.group(1) in labels, f"{name} has no label {matcher!r} (in {expr})"
    for grouping in GROUPING.findall(expr):
        for label in filter(None, (part.strip() for part in grouping.split(","))):
            assert label in carried, f"no series in {expr} carries {label!r}"


def expressions_in(document) -> list[str]:
    if isinstance(document, dict):
        found = [document["expr"]] if isinstance(document.get("expr"), str) else []
        return found + [expr for value in document.values() for expr in expressions_in(value)]
    if isinstance(document, list):
        return [expr for item in document for expr in expressions_in(item)]
    return []


def test_the_grafana_dashboard_uses_only_defined_metrics():
    dashboard = json.loads((DEPLOY / "grafana" / "imagegate-dashboard.json").read_text())
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert panels and all(panel["title"] and panel["targets"] for panel in panels)
    expressions = expressions_in(dashboard["panels"])
    for expr in expressions:
        check_expression(expr.replace("$__rate_interval", "5m").replace("$model", ".*"))
    used = {match.group(1) for expr in expressions for match in SELECTOR.finditer(expr)}
    # Throughput, latency, queue depth, errors per model, webhooks and the sweeper are all shown.
    for name in (
        "imagegate_tasks_ended_total",
        "imagegate_http_request_duration_seconds_bucket",
        "imagegate_queue_messages",
        "imagegate_upstream_calls_total",
        "imagegate_webhook_deliveries_total",
        "imagegate_sweeper_actions_total",
    ):
        assert name in used


def test_the_alert_rules_parse_and_use_only_defined_metrics():
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert len({rule["alert"] for rule in alerts}) == len(alerts) >= 10
    for rule in alerts:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s")), rule["alert"]
        check_expression(rule["expr"])
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    wanted = {job for rule in alerts for job in re.findall(r'job="([^"]+)"', rule["expr"])}
    assert wanted <= jobs


def test_times_read_back_from_the_embedded_sqlite_are_aware(tmp_path):
    from datetime import timedelta

    from sqlalchemy import create_engine

    from imagegate.app.heartbeats import Heart, recent
    from imagegate.app.metrics import seconds_since
    from imagegate.app.models import Base

    engine = create_engine(f"sqlite:///{tmp_path / 'embedded.db'}")
    Base.metadata.create_all(engine)
    Heart(engine, "worker").beat()
    (seen,) = recent(engine)
    assert seen.seen_at.tzinfo is not None and seen.started_at.tzinfo is not None
    assert 0 <= seconds_since(seen.started_at) < timedelta(minutes=1).total_seconds()
