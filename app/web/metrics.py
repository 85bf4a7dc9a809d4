"""GET /metrics (Prometheus), and the count and time of every request the API answers.

/metrics needs no key, like /healthz: it holds no secret, only counts. Do not expose it publicly.
"""

from __future__ import annotations

import time

from flask import Blueprint, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from imagegate.app.metrics import HTTP_METHODS, UNMATCHED_ROUTE, metrics, scraped_registry

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def metrics_page() -> Response:
    return Response(generate_latest(scraped_registry()), headers={"Content-Type": CONTENT_TYPE_LATEST})


@bp.before_app_request
def _start_clock() -> None:
    g.metrics_started = time.perf_counter()


@bp.after_app_request
def _count(response: Response) -> Response:
    # The route's template, never the path: a task id or a scanner's random path is no label.
    route = request.url_rule.rule if request.url_rule else UNMATCHED_ROUTE
    method = request.method if request.method in HTTP_METHODS else "other"
    measured = metrics()
    measured.http_requests.labels(route, method, str(response.status_code)).inc()
    if started := g.get("metrics_started"):
        measured.http_request_duration.labels(route, method).observe(time.perf_counter() - started)
    return response
