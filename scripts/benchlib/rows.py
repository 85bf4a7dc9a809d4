"""One function per row of issue 8's table. Each returns {"imagegate": {...}, "<baseline>": {...},
"load 1m": x}, figures as plain numbers (None when not measurable)."""

from __future__ import annotations

import json
import os
import time

import httpx
import psycopg

from benchlib import loadgen
from benchlib.environment import LITELLM_KEY, MODEL, Environment, log_errors, wait_ready
from benchlib.services import Proc, wait_until

MB = 1024 * 1024
STALL_S = 30  # no task ended and no upstream call running for this long: the rest are stranded


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _body(**extra) -> dict:
    return {"model": MODEL, "prompt": "a lighthouse at dusk", "response_format": "b64_json", **extra}


# -- worker rows ---------------------------------------------------------------------------------


def _enqueue_batches(env: Environment, count: int) -> None:
    """Tasks submitted through the API as batches (worker stopped); waits until all are published."""
    env.ensure_api()
    before = env.queue_length("imagegate.batch")
    for start in range(0, count, 10_000):
        size = min(10_000, count - start)
        lines = "\n".join(json.dumps({"custom_id": f"t{start + i}", "body": _body()}) for i in range(size))
        reply = httpx.post(
            f"{env.api_url}/v1/images/batches",
            content=lines.encode(),
            timeout=300,
            headers={"Authorization": f"Bearer {env.key}", "Content-Type": "application/jsonl"},
        )
        reply.raise_for_status()
    wait_until(lambda: env.queue_length("imagegate.batch") >= before + count, 300, "the batch messages")


def _drain(worker: Proc, env: Environment, database: str, count: int, done_count, timeout_s: float) -> dict:
    """Measure a worker started on a backlog of `count` tasks until `done_count(conn)` reaches it."""
    pg, redis = env.pg, env.redis.proc
    launched_at = worker.ps.create_time()
    ready_at = wait_ready(worker)
    cpu_worker0, cpu_pg0, cpu_redis0 = worker.cpu_s(), pg.cpu_s(), redis.cpu_s()
    polls = 0
    peak_rss = worker.rss()
    with psycopg.connect(pg.url(database, "postgresql"), autocommit=True) as conn:
        commits0 = conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (database,)).fetchone()[
            0
        ]
        deadline = time.monotonic() + timeout_s
        finished = ended = 0
        end_at = time.time()
        while time.monotonic() < deadline:
            now = time.time()
            finished, previous = done_count(conn)
            polls += 1
            if finished and previous > ended:
                end_at = now  # the last time a task was seen ending
            ended = previous
            peak_rss = max(peak_rss, worker.rss())
            if ended >= count or not worker.alive():
                break
            # Stranded tasks (a lost ack waits for the visibility timeout) must not stall the bench.
            if now - end_at > STALL_S and env.upstream_control("_stats")["in_flight"] == 0:
                break
            time.sleep(0.2)
        cpu_worker1, cpu_pg1, cpu_redis1 = worker.cpu_s(), pg.cpu_s(), redis.cpu_s()
        run_log = worker.log_text()
        worker.stop()  # its backends exit and flush their statistics
        time.sleep(1.0)
        commits1 = conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (database,)).fetchone()[
            0
        ]
    stats = env.upstream_control("_stats")
    started_at = stats["first_call_at"] or ready_at
    errors = log_errors(run_log)
    errors["error lines at stop (SIGTERM)"] = log_errors(worker.log_text()[len(run_log) :])["error lines"]
    return {
        "tasks/s": finished / max(end_at - started_at, 1e-9),
        "succeeded": finished,
        "failed": ended - finished,
        "unfinished": count - ended,
        "s from launch to first call": started_at - launched_at,
        "upstream calls": stats["calls"],
        "peak in flight": stats["peak_in_flight"],
        "worker CPU ms/task": (cpu_worker1 - cpu_worker0) * 1000 / max(finished, 1),
        "Postgres CPU ms/task": (cpu_pg1 - cpu_pg0) * 1000 / max(finished, 1),
        "Redis CPU ms/task": (cpu_redis1 - cpu_redis0) * 1000 / max(finished, 1),
        "commits/task": (commits1 - commits0 - polls - 1) / max(finished, 1),
        "peak RSS MB": peak_rss / MB,
        **errors,
    }


def _imagegate_worker_run(env: Environment, tasks: int, args: tuple[str, ...], timeout_s: float) -> dict:
    env.stop_worker()
    env.drop_queues()
    env.set_latency(env.latency_s)
    idle = env.start_worker(*args)  # an idle worker, for the RSS it costs before any call
    wait_ready(idle)
    idle_rss = 0
    for _ in range(4):
        time.sleep(0.5)
        idle_rss = max(idle_rss, idle.rss())
    env.stop_worker()
    _enqueue_batches(env, tasks)
    with psycopg.connect(env.pg.url("imagegate", "postgresql"), autocommit=True) as conn:
        base = env.task_counts(conn)
    env.upstream_control("_reset")

    def done_count(conn):
        counts = env.task_counts(conn)
        succeeded = counts.get("succeed", 0) - base.get("succeed", 0)
        return succeeded, succeeded + counts.get("failed", 0) - base.get("failed", 0)

    worker = env.start_worker(*args)
    figures = _drain(worker, env, "imagegate", tasks, done_count, timeout_s)
    env.stop_worker()
    figures["idle RSS MB"] = idle_rss / MB
    figures["RSS MB per call in flight"] = (
        (figures["peak RSS MB"] * MB - idle_rss) / MB / max(figures["peak in flight"], 1)
    )
    return figures


def naive_worker_run(env: Environment, tasks: int, timeout_s: float) -> dict:
    from benchlib import naive_celery

    env.drop_queues()
    env.set_latency(env.latency_s)
    with psycopg.connect(env.pg.url("naive", "postgresql"), autocommit=True) as conn:
        base = conn.execute("SELECT count(*) FROM naive_images").fetchone()[0]
    naive_celery.celery.conf.broker_url = env.naive_env["NAIVE_BROKER_URL"]
    with naive_celery.celery.producer_or_acquire() as producer:
        for index in range(tasks):
            naive_celery.celery.send_task("naive.generate", args=[f"t{index}", "a lighthouse"], producer=producer)
    env.upstream_control("_reset")

    def done_count(conn):
        stored = conn.execute("SELECT count(*) FROM naive_images").fetchone()[0] - base
        return stored, stored

    worker = env.start_naive_worker()
    figures = _drain(worker, env, "naive", tasks, done_count, timeout_s)
    env.stack.stop(worker)
    return figures


def worker_row(env: Environment, opts, args: tuple[str, ...], naive_cache: dict) -> dict:
    timeout_s = max(180.0, opts.tasks / 5)
    result = {"imagegate": _imagegate_worker_run(env, opts.tasks, args, timeout_s)}
    if "naive" not in naive_cache:
        naive_cache["naive"] = naive_worker_run(env, opts.tasks, timeout_s)
    result["naive Celery threads(64) + httpx"] = naive_cache["naive"]
    result["load 1m"] = _load()
    return result


# -- intake rows ---------------------------------------------------------------------------------


def async_submit_row(env: Environment, opts) -> dict:
    env.stop_worker()
    api = env.ensure_api()
    body = _body(**{"async": True})
    loadgen.closed_loop(f"{env.api_url}/v1/images/generations", body, connections=8, duration_s=2, key=env.key)

    def measure(proc, url, key):
        cpu0, pg0 = proc.cpu_s(), env.pg.cpu_s()
        run = loadgen.closed_loop(url, body, connections=64, duration_s=opts.duration_s, key=key)
        cpu1, pg1 = proc.cpu_s(), env.pg.cpu_s()
        return {
            "req/s": run["rps"],
            "API CPU ms/req": (cpu1 - cpu0) * 1000 / max(run["requests"], 1),
            "Postgres CPU ms/req": (pg1 - pg0) * 1000 / max(run["requests"], 1),
            "p50 ms": run["p50_ms"],
            "p99 ms": run["p99_ms"],
            "non-2xx": run["non2xx"],
            "errors": run["errors"],
            **({"load client CPU ms/req": run["client CPU ms/req"]} if "client CPU ms/req" in run else {}),
        }

    result = {"imagegate": measure(api, f"{env.api_url}/v1/images/generations", env.key)}
    flask, flask_url = env.start_naive_flask()
    loadgen.closed_loop(f"{flask_url}/v1/images/generations", body, connections=8, duration_s=2)
    result["Flask + gunicorn gthread(2x8)"] = measure(flask, f"{flask_url}/v1/images/generations", None)
    naive_rps, mine = result["Flask + gunicorn gthread(2x8)"]["req/s"], result["imagegate"]
    mine["req/s ÷ baseline's, this run"] = mine["req/s"] / naive_rps if naive_rps else None
    env.stack.stop(flask)
    result["load 1m"] = _load()
    env.drop_queues()
    return result


def batch_row(env: Environment, opts) -> dict:
    env.stop_worker()
    env.ensure_api()
    env.drop_queues()
    size = 10_000
    lines = "\n".join(json.dumps({"custom_id": f"line-{i}", "body": _body()}) for i in range(size)).encode()
    started = time.perf_counter()
    reply = httpx.post(
        f"{env.api_url}/v1/images/batches",
        content=lines,
        timeout=300,
        headers={"Authorization": f"Bearer {env.key}", "Content-Type": "application/jsonl"},
    )
    answered = time.perf_counter() - started
    reply.raise_for_status()
    published = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if env.queue_length("imagegate.batch") >= size:
            published = time.perf_counter() - started
            break
        time.sleep(0.05)
    result = {
        "imagegate": {"answer s": answered, "all published s": published, "status": reply.status_code},
        "load 1m": _load(),
    }
    env.drop_queues()
    return result


# -- sync rows -----------------------------------------------------------------------------------


def _litellm(env: Environment, result: dict) -> str | None:
    url = env.ensure_litellm()
    if url is None:
        result["LiteLLM proxy"] = {"n/a": env.litellm_error}
    return url


def sync_latency_row(env: Environment, opts) -> dict:
    env.ensure_api()
    env.ensure_worker()
    env.set_latency(0)
    body = _body()
    duration = opts.duration_s

    def run(url, key=None):
        loadgen.closed_loop(url, body, connections=1, duration_s=2, key=key)  # warm-up
        return loadgen.closed_loop(url, body, connections=1, duration_s=duration, key=key)

    direct = run(env.upstream_url)
    result: dict = {"direct call": {"p50 ms": direct["p50_ms"], "p99 ms": direct["p99_ms"]}}

    def added(name, measured):
        result[name] = {
            "added p50 ms": measured["p50_ms"] - direct["p50_ms"],
            "added p99 ms": measured["p99_ms"] - direct["p99_ms"],
            "req/s": measured["rps"],
            "non-2xx": measured["non2xx"],
            "errors": measured["errors"],
        }

    added("imagegate", run(f"{env.api_url}/v1/images/generations", env.key))
    url = _litellm(env, result)
    if url:
        added("LiteLLM proxy", run(f"{url}/v1/images/generations", LITELLM_KEY))
    env.set_latency(env.latency_s)
    result["load 1m"] = _load()
    return result


def sync_throughput_row(env: Environment, opts) -> dict:
    env.ensure_api()
    env.ensure_worker()
    env.set_latency(0)
    body = _body()
    result: dict = {}
    litellm_url = _litellm(env, result)
    duration = 2 * opts.duration_s  # at c=128 one request takes several seconds: let each client loop a few times
    for connections in (16, 128):
        with psycopg.connect(env.pg.url("imagegate", "postgresql"), autocommit=True) as conn:
            before = env.task_counts(conn).get("succeed", 0)
            run = loadgen.closed_loop(
                f"{env.api_url}/v1/images/generations", body, connections=connections, duration_s=duration, key=env.key
            )
            time.sleep(2)
            stored = env.task_counts(conn).get("succeed", 0) - before
        result.setdefault("imagegate", {}).update(
            {
                f"c={connections} req/s": run["rps"],
                f"c={connections} answered": run["requests"] - run["non2xx"],
                f"c={connections} tasks succeeded": stored,
                f"c={connections} p99 ms": run["p99_ms"],
                f"c={connections} non-2xx": run["non2xx"],
                f"c={connections} errors": run["errors"],
            }
        )
        if litellm_url:
            run = loadgen.closed_loop(
                f"{litellm_url}/v1/images/generations",
                body,
                connections=connections,
                duration_s=duration,
                key=LITELLM_KEY,
            )
            result.setdefault("LiteLLM proxy", {}).update(
                {
                    f"c={connections} req/s": run["rps"],
                    f"c={connections} p99 ms": run["p99_ms"],
                    f"c={connections} non-2xx": run["non2xx"],
                    f"c={connections} errors": run["errors"],
                }
            )
    env.set_latency(env.latency_s)
    result["load 1m"] = _load()
    return result


WARM_UP_BURST = 100


def sync_1000_row(env: Environment, opts) -> dict:
    count = opts.burst
    env.ensure_api(workers=1)
    env.ensure_worker()
    env.set_latency(env.latency_s)
    body = _body()

    def figures(run):
        return {
            "answered with image": run["answered"],
            "sent": run["count"],
            "p50 ms": run["p50_ms"],
            "p99 ms": run["p99_ms"],
            "slowest ms": run["max_ms"],
            "statuses": ", ".join(f"{k}:{v}" for k, v in sorted(run["statuses"].items())),
        }

    def measured(url, key=None):
        # Each target first answers a small burst, as the other rows warm up: a server just started
        # (the API is restarted with one process for this row) opens its connections meanwhile.
        loadgen.burst(url, body, count=WARM_UP_BURST, key=key, timeout_s=opts.burst_timeout_s)
        env.upstream_control("_reset")  # the peak in flight is the burst's own
        run = figures(loadgen.burst(url, body, count=count, key=key, timeout_s=opts.burst_timeout_s))
        return run | {"peak in flight": env.upstream_control("_stats")["peak_in_flight"]}

    result: dict = {"imagegate": measured(f"{env.api_url}/v1/images/generations", env.key)}
    url = _litellm(env, result)
    if url:
        result["LiteLLM proxy"] = measured(f"{url}/v1/images/generations", LITELLM_KEY)
    result["direct call"] = measured(env.upstream_url)
    env.set_latency(env.latency_s)
    env.ensure_api()  # back to the defaults
    result["load 1m"] = _load()
    return result


ROWS = {
    "worker-default": (
        "worker, 1 s upstream, `imagegate worker` (defaults)",
        lambda env, opts, cache: worker_row(env, opts, (), cache),
    ),
    "worker-1000": (
        "worker, 1 s upstream, `imagegate worker --concurrency 1000`",
        lambda env, opts, cache: worker_row(env, opts, ("--concurrency", "1000"), cache),
    ),
    "async-submit": ("async submit (no worker running), c=64", lambda env, opts, cache: async_submit_row(env, opts)),
    "sync-latency": (
        "sync mode at c=1, 0 ms upstream: latency added over a direct call",
        lambda env, opts, cache: sync_latency_row(env, opts),
    ),
    "sync-throughput": (
        "sync mode throughput c=16 / c=128, 0 ms upstream",
        lambda env, opts, cache: sync_throughput_row(env, opts),
    ),
    "sync-1000": (
        "1,000 concurrent sync requests, one API process (`--workers 1`), 1 s upstream",
        lambda env, opts, cache: sync_1000_row(env, opts),
    ),
    "batch": (
        "10,000-line batch: answer / all messages published (no worker)",
        lambda env, opts, cache: batch_row(env, opts),
    ),
}
