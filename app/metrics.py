"""Every Prometheus metric imagegate exports, declared in one place: names, labels and buckets.

Label values are bounded: route templates (never paths), HTTP status codes and classes, model names
from the providers file, error codes and outcomes from fixed enums. Never a task id, key or prompt.

Each process builds its metrics on first use (`metrics()`), not at import: prometheus-client picks
its multiprocess mode when it is first imported, which for the API must come after
PROMETHEUS_MULTIPROC_DIR is set (app/web/server.py). The API serves them on /metrics
(app/web/metrics.py); the worker and the sweeper on a port of their own (`serve_metrics`), the
sweeper adding what it reads from Postgres and the broker at scrape time (`BacklogCollector`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
    values,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select

from imagegate.app.heartbeats import recent
from imagegate.app.models import Task, utcnow
from imagegate.app.queue import WORKER_QUEUES, messages_queued

log = logging.getLogger(__name__)

# Seconds. Requests include synchronous ones, which wait for their images (up to 300 s by default).
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
QUEUE_WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
TASK_BUCKETS = (0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
UPSTREAM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
WEBHOOK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30)
SWEEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# The closed sets some labels take.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "unmatched"  # a path no route answers: never the path itself
UPSTREAM_OUTCOMES = ("2xx", "3xx", "4xx", "5xx", "timeout", "connection_error", "error")
UPSTREAM_CALL_KINDS = ("generate", "edit", "submit", "poll")
WEBHOOK_OUTCOMES = ("delivered", "retrying", "failed", "disabled")
SWEEPER_ACTIONS = ("deadline_failed", "taken_back", "attempts_exhausted", "republished", "publish_failed")
LIVE_STATUSES = ("pending", "running")


def status_class(status: int) -> str:
    return f"{status // 100}xx"


def seconds_since(moment: datetime) -> float:
    return max(0.0, (utcnow() - moment).total_seconds())


@dataclass(frozen=True)
class Spec:
    """One metric: its kind, name (with its unit and `_total` suffix), help and label names."""

    kind: type[Counter] | type[Gauge] | type[Histogram]
    name: str
    doc: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    def make(self, registry: CollectorRegistry) -> Any:
        if self.kind is Histogram:
            return Histogram(self.name, self.doc, self.labels, buckets=self.buckets, registry=registry)
        if self.kind is Gauge:  # a worker's own count; summed over the live processes of a multiprocess API
            return Gauge(self.name, self.doc, self.labels, registry=registry, multiprocess_mode="livesum")
        return Counter(self.name, self.doc, self.labels, registry=registry)


# Every metric a process records, by the attribute of Metrics that holds it.
SPECS: dict[str, Spec] = {
    # The API.
    "http_requests": Spec(
        Counter,
        "imagegate_http_requests_total",
        "Requests the API answered, by route template, method and status code.",
        ("route", "method", "status"),
    ),
    "http_request_duration": Spec(
        Histogram,
        "imagegate_http_request_duration_seconds",
        "Time to answer a request, by route template and method (synchronous ones wait for their images).",
        ("route", "method"),
        REQUEST_BUCKETS,
    ),
    "sync_replies": Spec(
        Counter,
        "imagegate_sync_replies_total",
        "Synchronous requests answered with their task's images, by where the reply came from: "
        "handed_over (by the worker, with the images in hand) or database (read back from the stored task).",
        ("source",),
    ),
    # The worker: tasks.
    "task_time_to_start": Spec(
        Histogram,
        "imagegate_task_time_to_start_seconds",
        "From intake to the claim of the task's first attempt, by requested model.",
        ("model",),
        QUEUE_WAIT_BUCKETS,
    ),
    "task_time_to_end": Spec(
        Histogram,
        "imagegate_task_time_to_end_seconds",
        "From intake to the end a worker wrote, by requested model and final status.",
        ("model", "status"),
        TASK_BUCKETS,
    ),
    "tasks_ended": Spec(
        Counter,
        "imagegate_tasks_ended_total",
        "Tasks a worker ended, by requested model, final status and error code ('none' when it succeeded).",
        ("model", "status", "error_code"),
    ),
    "attempts_in_flight": Spec(Gauge, "imagegate_attempts_in_flight", "Attempts the worker process is running now."),
    "retries": Spec(
        Counter,
        "imagegate_task_retries_total",
        "Attempts scheduled again on the same model after a retryable error, by model and error code.",
        ("model", "error_code"),
    ),
    "fallbacks": Spec(
        Counter,
        "imagegate_task_fallbacks_total",
        "Tasks handed to a fallback model once retries were spent, by model left and model taken.",
        ("model", "fallback"),
    ),
    # The worker: upstreams and images.
    "upstream_calls": Spec(
        Counter,
        "imagegate_upstream_calls_total",
        "Upstream calls by model served, kind (generate, edit, submit, poll) and outcome "
        "(status class, timeout, connection_error, error).",
        ("model", "kind", "outcome"),
    ),
    "upstream_call_duration": Spec(
        Histogram,
        "imagegate_upstream_call_duration_seconds",
        "Time of one upstream call, by model served and kind.",
        ("model", "kind"),
        UPSTREAM_BUCKETS,
    ),
    "images_stored": Spec(Counter, "imagegate_images_stored_total", "Images stored, by model served.", ("model",)),
    "image_bytes_stored": Spec(
        Counter, "imagegate_images_stored_bytes_total", "Bytes of the images stored, by model served.", ("model",)
    ),
    # The worker: webhooks.
    "webhook_deliveries": Spec(
        Counter,
        "imagegate_webhook_deliveries_total",
        "Webhook delivery attempts by outcome (delivered, retrying, failed: retries spent, disabled: 410).",
        ("outcome",),
    ),
    "webhook_delivery_duration": Spec(
        Histogram,
        "imagegate_webhook_delivery_duration_seconds",
        "Time of one webhook delivery attempt.",
        buckets=WEBHOOK_BUCKETS,
    ),
    "webhook_lane_full": Spec(
        Counter,
        "imagegate_webhook_lane_full_total",
        "Webhook events left in the outbox because the delivery lane (or its key's share) was full.",
    ),
    # The sweeper.
    "sweeper_actions": Spec(
        Counter,
        "imagegate_sweeper_actions_total",
        "Tasks the sweeper acted on: deadline_failed, taken_back (expired lease), attempts_exhausted, "
        "republished (message lost), publish_failed, images_expired (retention deleted their images).",
        ("action",),
    ),
    "sweep_duration": Spec(
        Histogram, "imagegate_sweep_duration_seconds", "Time of one sweep pass.", buckets=SWEEP_BUCKETS
    ),
    "sweep_errors": Spec(
        Counter, "imagegate_sweep_errors_total", "Sweep passes that failed (database or broker down)."
    ),
}

# Read by the sweeper at scrape time (BacklogCollector), from Postgres and the broker.
BACKLOG_SPECS: dict[str, Spec] = {
    "tasks": Spec(
        Gauge, "imagegate_tasks", "Live (pending, running) tasks by requested model and status.", ("model", "status")
    ),
    "queues": Spec(Gauge, "imagegate_queue_messages", "Messages waiting in a broker queue.", ("queue",)),
    "seen": Spec(
        Gauge,
        "imagegate_processes_seen",
        "Worker and sweeper processes whose heartbeat is under a minute old.",
        ("kind",),
    ),
}


class Metrics:
    """The metrics of one process, registered on `registry`: one attribute per entry of SPECS."""

    http_requests: Counter
    http_request_duration: Histogram
    sync_replies: Counter
    task_time_to_start: Histogram
    task_time_to_end: Histogram
    tasks_ended: Counter
    attempts_in_flight: Gauge
    retries: Counter
    fallbacks: Counter
    upstream_calls: Counter
    upstream_call_duration: Histogram
    images_stored: Counter
    image_bytes_stored: Counter
    webhook_deliveries: Counter
    webhook_delivery_duration: Histogram
    webhook_lane_full: Counter
    sweeper_actions: Counter
    sweep_duration: Histogram
    sweep_errors: Counter

    def __init__(self, registry: CollectorRegistry = REGISTRY):
        for attribute, spec in SPECS.items():
            setattr(self, attribute, spec.make(registry))


@functools.cache
def metrics() -> Metrics:
    """This process's metrics, on the default registry, built on first use."""
    disable_created_metrics()  # a `_created` series beside every counter doubles the series for little
    return Metrics()


class BacklogCollector(Collector):
    """Read at scrape time, by the sweeper: live tasks by model and status (pending and running only,
    served by the status indexes; ended tasks are counted by imagegate_tasks_ended_total), the
    messages waiting in each queue (Redis and RabbitMQ brokers), and the processes whose heartbeat is recent."""

    def __init__(self, engine: Engine, broker: Any = None):
        self.engine, self.broker = engine, broker

    @staticmethod
    def describe() -> list[GaugeMetricFamily]:
        """The families, empty: what the registry checks on registration, with no query."""
        return [GaugeMetricFamily(spec.name, spec.doc, labels=spec.labels) for spec in BACKLOG_SPECS.values()]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        tasks, queues, seen = self.describe()
        try:
            query = select(Task.model, Task.status, func.count()).where(Task.status.in_(LIVE_STATUSES))
            with self.engine.connect() as connection:
                counts = connection.execute(query.group_by(Task.model, Task.status)).all()
            for model, status, count in counts:
                tasks.add_metric([model, str(status)], count)
            kinds = [process.kind for process in recent(self.engine)]
            for kind in ("worker", "sweeper"):
                seen.add_metric([kind], kinds.count(kind))
        except Exception as exc:  # a scrape during an outage shows what it could read
            log.warning("metrics: could not read the tasks: %s", exc)
        if self.broker is not None:
            try:
                for queue, count in messages_queued(self.broker, list(WORKER_QUEUES)).items():
                    queues.add_metric([queue], count)
            except Exception as exc:
                log.warning("metrics: could not read the queue lengths: %s", exc)
        return [tasks, queues, seen]


def scraped_registry() -> CollectorRegistry:
    """What /metrics exposes: in multiprocess mode (gunicorn's workers) the sum of every process's
    files, else this process's own metrics. Asks prometheus-client which mode it is in, since that
    was fixed when it was first imported."""
    if values.ValueClass is values.MutexValue:
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return registry


def serve_metrics(port: int, *, host: str = "0.0.0.0", collectors: Iterable[Collector] = ()) -> None:
    """Serve this process's metrics on http://host:port/metrics (a worker or the sweeper), with
    `collectors` read at scrape time; in multiprocess mode (a group of worker processes) the sum of
    every process's. Raises OSError when the port is taken."""
    metrics()  # every family is listed from the first scrape
    registry = scraped_registry()
    for collector in collectors:
        registry.register(collector)
    start_http_server(port, addr=host, registry=registry)
