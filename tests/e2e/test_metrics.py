"""Prometheus metrics as an operator scrapes them: the real API (gunicorn, two workers), a real worker
and a real sweeper, each started with its metrics port, on a redis-server of this module's own so
that every task here is this worker's and the counts are exact."""

from __future__ import annotations

import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.support.fake_upstream import Step
from tests.support.flows import submit_async, wait_for_end
from tests.support.processes import create_key, start_api, start_process, start_worker, stop_process
from tests.support.services import free_port, http_ok, start_redis, wait_until

pytestmark = pytest.mark.e2e


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a /metrics page, by name and labels."""
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def metric_files(pid: int) -> set[Path]:
    """The prometheus-client files a process has mapped (once it has made its metrics)."""
    paths = {Path(line.split()[-1]) for line in Path(f"/proc/{pid}/maps").read_text().splitlines()}
    return {path for path in paths if path.suffix == ".db" and path.name.endswith(f"_{pid}.db")}


LOOKUP = {"route": "/v1/images/<task_id:task_id>", "method": "GET"}


def lookups_counted(path: Path) -> float:
    """The task lookups answered 404 that one gunicorn worker counted, read from its own file."""
    if not path.exists():
        return 0.0
    for metric in MultiProcessCollector.merge([str(path)], accumulate=False):
        for sample in metric.samples:
            if sample.name == "imagegate_http_requests_total" and sample.labels == LOOKUP | {"status": "404"}:
                return sample.value
    return 0.0


class Hooks(ThreadingHTTPServer):
    """A webhook receiver: /ok answers 200, anything else 500."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(200 if self.path == "/ok" else 500)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


@pytest.fixture(scope="module")
def stack(env, migrated, run_dir):
    redis_server = start_redis()
    api_port, worker_port, sweeper_port = free_port(), free_port(), free_port()
    own = env | {
        "IMAGEGATE_BROKER_URL": f"{redis_server.url}/0",
        "IMAGEGATE_PUBLIC_URL": f"http://127.0.0.1:{api_port}",
        "IMAGEGATE_SWEEP_INTERVAL_S": "0.5",
    }
    own.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the API makes a private one
    api = start_api(own, run_dir / "metrics-api.log", api_port, workers=2)
    worker = start_worker(own, run_dir / "metrics-worker.log", "--metrics-port", str(worker_port), concurrency=20)
    sweeper = start_process(["sweeper", "--metrics-port", str(sweeper_port)], own, run_dir / "metrics-sweeper.log")
    hooks = Hooks()
    url = f"http://127.0.0.1:{api_port}"
    wait_until(lambda: http_ok(f"http://127.0.0.1:{sweeper_port}/metrics"), 30, "the sweeper's metrics")
    key = create_key(own, f"metrics-{uuid.uuid4().hex[:8]}")
    yield {
        "api": api,
        "url": url,
        "key": key,
        "worker_metrics": f"http://127.0.0.1:{worker_port}/metrics",
        "sweeper_metrics": f"http://127.0.0.1:{sweeper_port}/metrics",
        "hooks": hooks,
    }
    hooks.shutdown()
    for process in (sweeper, worker, api):
        stop_process(process)
    redis_server.stop()


@pytest.fixture
def stack_client(stack):
    with httpx.Client(base_url=stack["url"], headers={"Authorization": f"Bearer {stack['key']}"}, timeout=60) as http:
        yield http


def test_the_worker_counts_calls_retries_fallbacks_images_and_ends(stack, stack_client, upstream, prompt):
    upstream.script(prompt + " fails", Step(status=500), Step(status=500))
    upstream.script(prompt + " falls back", Step(status=500))
    done = stack_client.post("/v1/images/generations", json={"model": "fake-dalle", "prompt": prompt})
    assert done.status_code == 200, done.text
    failing = submit_async(stack_client, model="fake-dalle", prompt=prompt + " fails", retries=1)
    falling = submit_async(stack_client, model="fake-primary", prompt=prompt + " falls back")
    assert wait_for_end(stack_client, failing)["task_status"] == "failed"
    assert wait_for_end(stack_client, falling)["task_status"] == "succeed"

    samples = scrape(stack["worker_metrics"])
    calls = "imagegate_upstream_calls_total"
    assert value(samples, calls, model="fake-dalle", kind="generate", outcome="2xx") == 1
    assert value(samples, calls, model="fake-dalle", kind="generate", outcome="5xx") == 2
    assert value(samples, calls, model="fake-primary", kind="generate", outcome="5xx") == 1
    assert value(samples, calls, model="fake-backup", kind="generate", outcome="2xx") == 1
    assert value(samples, "imagegate_upstream_call_duration_seconds_count", model="fake-dalle", kind="generate") == 3
    assert value(samples, "imagegate_task_retries_total", model="fake-dalle", error_code="upstream_error") == 1
    assert value(samples, "imagegate_task_fallbacks_total", model="fake-primary", fallback="fake-backup") == 1
    ended = "imagegate_tasks_ended_total"
    assert value(samples, ended, model="fake-dalle", status="succeed", error_code="none") == 1
    assert value(samples, ended, model="fake-dalle", status="failed", error_code="upstream_error") == 1
    assert value(samples, ended, model="fake-primary", status="succeed", error_code="none") == 1
    assert value(samples, "imagegate_images_stored_total", model="fake-dalle") == 1
    assert value(samples, "imagegate_images_stored_total", model="fake-backup") == 1
    assert value(samples, "imagegate_images_stored_bytes_total", model="fake-dalle") > 0
    assert value(samples, "imagegate_task_time_to_start_seconds_count", model="fake-dalle") == 2
    assert value(samples, "imagegate_task_time_to_end_seconds_count", model="fake-dalle", status="failed") == 1
    # A task reads as ended a moment before its worker leaves the attempt: idle comes back to 0 soon.
    wait_until(lambda: value(scrape(stack["worker_metrics"]), "imagegate_attempts_in_flight") == 0, 10, "idle")
    text = httpx.get(stack["worker_metrics"]).text
    assert failing not in text and prompt not in text and stack["key"] not in text


def test_the_worker_counts_webhook_deliveries_by_outcome(stack, stack_client):
    hooks = stack["hooks"]
    for path in ("/ok", "/broken"):
        submit_async(stack_client, model="local", prompt="a hook", size="16x16", callback_url=hooks.url(path))

    def counted() -> dict:
        samples = scrape(stack["worker_metrics"])
        return {
            outcome: value(samples, "imagegate_webhook_deliveries_total", outcome=outcome)
            for outcome in ("delivered", "retrying")
        }

    wait_until(lambda: counted()["delivered"] >= 1 and counted()["retrying"] >= 1, 30, "both webhook outcomes")
    samples = scrape(stack["worker_metrics"])
    assert value(samples, "imagegate_webhook_delivery_duration_seconds_count") >= 2


def test_the_sweeper_reports_its_passes_and_the_live_backlog(stack, stack_client, upstream, prompt):
    upstream.script(prompt, Step(pending_polls=10_000))
    task_id = submit_async(stack_client, model="fake-async", prompt=prompt)

    def running() -> float:
        samples = scrape(stack["sweeper_metrics"])
        return value(samples, "imagegate_tasks", model="fake-async", status="running")

    wait_until(lambda: running() >= 1, 30, "the running task in the sweeper's metrics")
    samples = scrape(stack["sweeper_metrics"])
    assert value(samples, "imagegate_sweep_duration_seconds_count") >= 1
    assert value(samples, "imagegate_processes_seen", kind="worker") >= 1
    assert value(samples, "imagegate_processes_seen", kind="sweeper") >= 1
    assert ("imagegate_queue_messages", frozenset({("queue", "imagegate")})) in samples
    assert ("imagegate_sweeper_actions_total", frozenset({("action", "taken_back")})) in samples
    upstream.finish_async(prompt)
    assert wait_for_end(stack_client, task_id)["task_status"] == "succeed"


# Last: it stops the API, to see its private metrics directory go.
def test_the_api_counts_the_requests_of_both_gunicorn_workers_by_route_template(stack):
    workers = children(stack["api"].pid)
    assert len(workers) == 2
    headers = {"Authorization": f"Bearer {stack['key']}"}
    sent, counted = 0, {}
    # A new connection per request, so gunicorn's workers take turns; until each has counted some.
    while sent < 400 and not (counted and all(counted.values())):
        last = uuid.uuid4()
        assert httpx.get(f"{stack['url']}/v1/images/{last}", headers=headers, timeout=10).status_code == 404
        sent += 1
        directory = next(path.parent for pid in workers for path in metric_files(pid))
        counted = {pid: lookups_counted(directory / f"counter_{pid}.db") for pid in workers}
    assert all(counted.values()), f"one gunicorn worker served every request: {counted}"
    assert sum(counted.values()) == sent

    for _ in range(4):  # whichever worker answers the scrape sums every worker's counts
        samples = scrape(f"{stack['url']}/metrics")
        assert value(samples, "imagegate_http_requests_total", **LOOKUP, status="404") == sent
        answered = sum(
            count
            for (name, labels), count in samples.items()
            if name == "imagegate_http_requests_total" and LOOKUP.items() <= labels
        )
        assert value(samples, "imagegate_http_request_duration_seconds_count", **LOOKUP) == answered >= sent
    assert str(last) not in httpx.get(f"{stack['url']}/metrics").text  # a template, never the path

    stop_process(stack["api"])
    assert not directory.exists(), "the private metrics directory is removed when the API stops"
