"""Counting one run: from Postgres (what was accepted under the run's key, how each task ended, its
attempts), from the fake upstream (every call with its Idempotency-Key), from the webhook receiver
and from what the clients saw."""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import psycopg

from clusterlib.cluster import LIMITED_MODEL, LIMITS
from clusterlib.workload import Workload

ENDED = ("succeed", "failed")


@dataclass
class RunFigures:
    run: str
    worker_hosts: int
    accepted: int = 0  # tasks in Postgres under the run's key
    succeed: int = 0
    failed: int = 0
    lost: int = 0  # accepted and not ended when the run gave up waiting
    client_unanswered: int = 0  # requests no API host accepted in 5 minutes
    client_ids_missing: int = 0  # task ids a client was given that Postgres does not have
    upstream_calls: int = 0
    duplicate_calls: int = 0  # calls beyond the first with one Idempotency-Key (task, attempt, slot)
    tasks_over_attempts: int = 0  # tasks with more upstream calls than attempts recorded
    extra_attempts: int = 0  # attempts beyond the first (tasks taken back from a lost worker, retries)
    seconds: float = 0.0  # first attempt started -> last task ended
    tasks_per_s: float = 0.0
    webhooks_expected: int = 0  # events: one per task with a callback_url, one for the batch
    webhooks_delivered: int = 0  # of those, delivered (a 2xx from the receiver)
    webhooks_received: int = 0  # distinct webhook-ids the receiver saw
    webhooks_repeated: int = 0  # deliveries of an event already received (at least once, not exactly once)
    batches_open: int = 0  # batches not `completed` once every task ended
    sync_waiting: int = 0  # sync requests in flight when an API host was lost
    sync_on_lost_host: int = 0  # of those, waiting on the lost host: cut, or sent again by the balancer
    sync_cut: int = 0  # ... whose client saw the connection cut and sent the request again
    sync_resent_by_balancer: int = 0  # ... which the balancer sent to the other host itself
    sync_replayed: int = 0  # ... answered with the task already accepted (Idempotent-Replayed: true)
    sync_found: int = 0  # ... whose task, read by id after the answer, had succeeded
    served_by: dict = field(default_factory=dict)
    cpu_s: dict = field(default_factory=dict)  # CPU seconds used during the run, per host and by Postgres
    failures: dict = field(default_factory=dict)
    events: dict = field(default_factory=dict)  # what happened during the run (kills), with times
    # The limited model's limits and what the fake upstream saw of it since the cluster started:
    # the most calls in flight at once, the most calls arriving within any 60 s.
    limits: dict = field(default_factory=dict)

    @property
    def zero_loss(self) -> bool:
        return (
            self.lost == 0
            and self.failed == 0
            and self.client_unanswered == 0
            and self.client_ids_missing == 0
            and self.duplicate_calls == 0
            and self.tasks_over_attempts == 0
            and self.webhooks_delivered == self.webhooks_expected
            and self.batches_open == 0
            and self.limits_held
        )

    @property
    def limits_held(self) -> bool:
        limits = self.limits
        return not limits or (
            limits["peak_in_flight"] <= limits["max_concurrency"] and limits["most_in_60_s"] <= limits["rpm"]
        )

    def as_dict(self) -> dict:
        return asdict(self) | {"zero_loss": self.zero_loss, "limits_held": self.limits_held}


def wait_ended(cluster, key_id: str, expected: int, timeout_s: float) -> None:
    """Until `expected` tasks of the key exist and all have ended, or timeout_s."""
    deadline = time.monotonic() + timeout_s
    with cluster.connect() as conn:
        while time.monotonic() < deadline:
            total, ended = conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE status IN ('succeed', 'failed')) FROM tasks"
                " WHERE api_key_id = %s",
                (key_id,),
            ).fetchone()
            if total >= expected and ended == total:
                return
            time.sleep(0.5)


def wait_webhooks(cluster, key_id: str, timeout_s: float) -> None:
    """Until every event due has been delivered: one per ended task with a callback_url, one per
    completed batch with one (a batch closes just after its last task ends), or timeout_s."""
    deadline = time.monotonic() + timeout_s
    with cluster.connect() as conn:
        while time.monotonic() < deadline:
            due, delivered = conn.execute(
                "SELECT (SELECT count(*) FROM tasks WHERE api_key_id = %(key)s AND callback_url IS NOT NULL)"
                " + (SELECT count(*) FROM batches WHERE api_key_id = %(key)s AND callback_url IS NOT NULL),"
                " (SELECT count(*) FROM webhook_events WHERE api_key_id = %(key)s AND status = 'delivered')",
                {"key": key_id},
            ).fetchone()
            if delivered >= due:
                return
            time.sleep(0.5)


def count(cluster, key_id: str, workload: Workload, figures: RunFigures) -> RunFigures:
    with cluster.connect() as conn:
        rows = conn.execute(
            "SELECT id::text, status, attempts, error_code, error_message, callback_url IS NOT NULL"
            " FROM tasks WHERE api_key_id = %s",
            (key_id,),
        ).fetchall()
        first_start, last_end = conn.execute(
            "SELECT min(a.started_at), max(t.finished_at) FROM tasks t JOIN attempts a ON a.task_id = t.id"
            " WHERE t.api_key_id = %s",
            (key_id,),
        ).fetchone()
        delivered = conn.execute(
            "SELECT count(*) FILTER (WHERE status = 'delivered'), count(*) FROM webhook_events WHERE api_key_id = %s",
            (key_id,),
        ).fetchone()
        batches_with_callback, batches_open = conn.execute(
            "SELECT count(*) FILTER (WHERE callback_url IS NOT NULL), count(*) FILTER (WHERE status <> 'completed')"
            " FROM batches WHERE api_key_id = %s",
            (key_id,),
        ).fetchone()
    statuses = {row[0]: row[1] for row in rows}
    figures.accepted = len(rows)
    figures.succeed = sum(row[1] == "succeed" for row in rows)
    figures.failed = sum(row[1] == "failed" for row in rows)
    figures.lost = sum(row[1] not in ENDED for row in rows)
    figures.failures = dict(Counter(f"{row[3]}: {row[4]}" for row in rows if row[1] == "failed"))
    figures.extra_attempts = sum(max(0, row[2] - 1) for row in rows)
    figures.webhooks_expected = sum(bool(row[5]) for row in rows) + batches_with_callback
    figures.webhooks_delivered = delivered[0]
    figures.batches_open = batches_open

    requests = workload.requests
    figures.client_unanswered = sum(request.task_id is None for request in requests)
    figures.client_ids_missing = sum(
        request.task_id is not None and request.kind != "batch" and request.task_id not in statuses
        for request in requests
    )
    figures.sync_waiting = sum(request.kind == "sync" and request.waiting_at_loss for request in requests)
    lost_host = [request for request in requests if request.kind == "sync" and request.on_lost_host]
    figures.sync_on_lost_host = len(lost_host)
    figures.sync_cut = sum(bool(request.interrupted) for request in lost_host)
    figures.sync_resent_by_balancer = sum(not request.interrupted for request in lost_host)
    figures.sync_replayed = sum(request.replayed for request in lost_host)
    figures.sync_found = sum(request.found_by_id == "succeed" for request in lost_host)
    figures.served_by = dict(Counter(request.served_by for request in requests if request.served_by))

    per_key = cluster.upstream.calls_per_key(workload.prompts())
    figures.upstream_calls = sum(per_key.values())
    figures.duplicate_calls = sum(calls - 1 for calls in per_key.values() if calls > 1)
    attempts = {row[0]: row[2] for row in rows}
    calls_per_task = Counter(key.split("-", 1)[1].rsplit("-", 2)[0] for key in per_key.elements() if key)
    figures.tasks_over_attempts = sum(calls > attempts.get(task, 0) for task, calls in calls_per_task.items())

    received = [
        value
        for hit in cluster.receiver.calls_for(workload.callback_path)
        for name, value in hit.headers.items()
        if name.lower() == "webhook-id"
    ]
    figures.webhooks_received = len(set(received))
    figures.webhooks_repeated = len(received) - len(set(received))
    arrivals = cluster.upstream.call_times(LIMITED_MODEL)
    figures.limits = LIMITS | {
        "model": LIMITED_MODEL,
        "peak_in_flight": cluster.upstream.peak_in_flight(LIMITED_MODEL),
        "most_in_60_s": max((bisect.bisect_left(arrivals, at + 60) - i for i, at in enumerate(arrivals)), default=0),
        "calls": len(arrivals),
    }
    if first_start and last_end:
        figures.seconds = (last_end - first_start).total_seconds()
        figures.tasks_per_s = figures.accepted / figures.seconds if figures.seconds else 0.0
    return figures


class TakeBackWatch:
    """After a worker host is lost: how long until none of the tasks it was running is still
    `running` there (the sweeper took them back), and until each of them is claimed again or ended."""

    def __init__(self, cluster, key_id: str, host: str, killed_at: float):
        self.cluster, self.key_id, self.host, self.killed_at = cluster, key_id, host, killed_at
        with cluster.connect() as conn:
            self.running = dict(
                conn.execute(
                    "SELECT id::text, attempts FROM tasks WHERE api_key_id = %s AND status = 'running'"
                    " AND worker LIKE %s",
                    (key_id, f"%@{host}"),
                ).fetchall()
            )
        self.taken_back_s: float | None = None
        self.claimed_again_s: float | None = None
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        try:
            self._poll()
        except psycopg.Error:  # the run was interrupted and Postgres stopped: nothing more to see
            pass

    def _poll(self) -> None:
        ids = list(self.running)
        with self.cluster.connect() as conn:
            while self.claimed_again_s is None and time.monotonic() - self.killed_at < 600:
                rows = conn.execute(
                    "SELECT id::text, status, attempts, worker FROM tasks WHERE id::text = ANY(%s)", (ids,)
                ).fetchall()
                now = time.monotonic() - self.killed_at
                still_there = [row for row in rows if row[1] == "running" and (row[3] or "").endswith(f"@{self.host}")]
                if self.taken_back_s is None and not still_there:
                    self.taken_back_s = now
                if all(row[1] in ENDED or row[2] > self.running[row[0]] for row in rows):
                    self.claimed_again_s = now
                time.sleep(0.2)

    def result(self) -> dict:
        self._thread.join(timeout=5)
        return {
            "host": self.host,
            "running_on_it": len(self.running),
            "taken_back_s": self.taken_back_s,
            "claimed_again_s": self.claimed_again_s,
        }
