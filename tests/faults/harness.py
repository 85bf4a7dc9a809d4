"""A whole imagegate of a scenario's own: its database, a throwaway redis-server, real API, worker
and sweeper processes, and the shared fake upstream. Scenarios break parts of it and then count.

The figures come from Postgres (what ended, how) and from the fake upstream's log of every call with
its Idempotency-Key (task, attempt, fan-out slot), so a repeated call of one attempt is visible.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text

from imagegate.app.db import make_engine, make_sessionmaker
from imagegate.app.keys import create_key
from imagegate.app.migrate import upgrade
from tests.support.fake_upstream import FakeUpstream
from tests.support.services import free_port, http_ok, wait_until

IMAGEGATE = [str(Path(sys.executable).with_name("imagegate"))]  # the console script, as users run it
REPORT_ENV = "IMAGEGATE_FAULTS_REPORT"  # a JSON-lines file the figures are appended to, if set


@dataclass
class Figures:
    scenario: str
    submitted: int
    succeed: int
    failed: int
    lost: int
    duplicated: int
    upstream_calls: int
    seconds: float
    note: str = ""
    failures: Counter = field(default_factory=Counter)  # "code: message" of each failed task

    def line(self) -> str:
        return (
            f"faults {self.scenario}: submitted={self.submitted} succeed={self.succeed} failed={self.failed} "
            f"lost={self.lost} duplicated={self.duplicated} upstream_calls={self.upstream_calls} "
            f"seconds={self.seconds:.1f}"
            + (f" ({self.note})" if self.note else "")
            + "".join(f"\n  failed {count}x {why}" for why, count in self.failures.most_common())
        )

    def report(self, **extra) -> None:
        print(self.line())
        if os.environ.get(REPORT_ENV):
            with open(os.environ[REPORT_ENV], "a") as report:
                report.write(json.dumps(asdict(self) | extra) + "\n")


class Cluster:
    def __init__(
        self, directory: Path, database_url: str, redis_url: str, upstream: FakeUpstream, **settings: str
    ) -> None:
        self.directory, self.database_url, self.upstream = directory, database_url, upstream
        upgrade(database_url)
        self.key = create_key(make_sessionmaker(make_engine(database_url, pool_size=1)), "faults").key
        providers = directory / "providers.toml"
        providers.write_text(f"""
[models."fault"]
adapter = "openai"
base_url = "{upstream.base_url}"
timeout_s = 3
max_retries = 10
allow_private_downloads = true

[models."local"]
adapter = "local"
max_n = 2
max_pixels = 65536
""")
        self.api_port = free_port()
        self.env = (
            {name: value for name, value in os.environ.items() if not name.startswith("IMAGEGATE_")}
            | {
                "IMAGEGATE_DATABASE_URL": database_url,
                "IMAGEGATE_BROKER_URL": f"{redis_url}/0",
                "IMAGEGATE_PROVIDERS_FILE": str(providers),
                "IMAGEGATE_SECRET_KEY": secrets.token_urlsafe(32),
                "IMAGEGATE_PUBLIC_URL": f"http://127.0.0.1:{self.api_port}",
                "IMAGEGATE_LEASE_S": "3",
                "IMAGEGATE_SWEEP_INTERVAL_S": "0.5",
                "IMAGEGATE_REPUBLISH_AFTER_S": "5",
                "IMAGEGATE_RETRY_BASE_S": "0.2",
                "IMAGEGATE_RETRY_MAX_S": "5",
                "IMAGEGATE_SHUTDOWN_GRACE_S": "20",
                "IMAGEGATE_SYNC_TIMEOUT_S": "30",
                "IMAGEGATE_LOG_LEVEL": "WARNING",
                "IMAGEGATE_WORKER_PROCESSES": "1",  # the scenarios kill and count single processes
            }
            | {f"IMAGEGATE_{name.upper()}": value for name, value in settings.items()}
        )
        self.processes: list[subprocess.Popen] = []
        self.logs: list[Path] = []  # each process's output, in the order started
        self._engine = create_engine(database_url, pool_pre_ping=True)
        self.started = time.monotonic()

    # -- processes -------------------------------------------------------------------------------
    def start(self, *args: str) -> subprocess.Popen:
        path = self.directory / f"{args[0]}-{len(self.processes)}.log"
        with path.open("w") as log:  # the child holds its own copy of the descriptor
            process = subprocess.Popen(
                IMAGEGATE + list(args), env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.processes.append(process)
        self.logs.append(path)
        return process

    def start_worker(self, concurrency: int = 100) -> subprocess.Popen:
        process = self.start("worker", "--concurrency", str(concurrency), "--loglevel", "INFO")
        log = self.logs[-1]
        wait_until(lambda: process.poll() is not None or "ready" in log.read_text(), 60, "a worker")
        assert process.poll() is None, log.read_text()
        return process

    def start_api(self) -> str:
        self.start("api", "--port", str(self.api_port), "--workers", "1")
        url = f"http://127.0.0.1:{self.api_port}"
        wait_until(lambda: http_ok(f"{url}/healthz"), 60, "the API")
        self.api_url = url
        return url

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGCONT)
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self._engine.dispose()

    # -- work --------------------------------------------------------------------------------------
    def submit(self, count: int, label: str, steps: tuple = (), **fields) -> dict[str, str]:
        """Submit `count` async tasks over HTTP, each prompt scripted with `steps`; returns
        {task_id: prompt}. Prompts are unique."""
        tasks = {}
        with httpx.Client(base_url=self.api_url, headers={"Authorization": f"Bearer {self.key}"}, timeout=30) as http:
            for index in range(count):
                prompt = f"{label} {index} {uuid.uuid4().hex[:8]}"
                self.upstream.script(prompt, *[dataclasses.replace(step) for step in steps])
                response = http.post(
                    "/v1/images/generations", json={"model": "fault", "prompt": prompt, "async": True} | fields
                )
                assert response.status_code == 202, response.text
                tasks[response.json()["task_id"]] = prompt
        return tasks

    def statuses(self, task_ids) -> dict[str, str]:
        with self._engine.connect() as connection:
            rows = connection.execute(
                text("SELECT id::text, status FROM tasks WHERE id::text = ANY(:ids)"), {"ids": list(task_ids)}
            )
            return {row.id: row.status for row in rows}

    def wait_all_ended(self, task_ids, timeout_s: float = 120) -> None:
        def ended() -> bool:
            try:
                return all(status in ("succeed", "failed") for status in self.statuses(task_ids).values())
            except Exception:  # the database may be on its way back
                return False

        try:
            wait_until(ended, timeout_s, "every task to end", interval_s=0.5)
        except TimeoutError:  # the figures say how many were lost; this says where to look
            print(self.why_not_ended(task_ids))

    def why_not_ended(self, task_ids) -> str:
        """The tasks' statuses, and each process's exit status and last log lines: printed when a
        scenario times out, so a failure seen once (in CI, say) carries its evidence with it."""
        try:
            lines = [f"statuses: {dict(Counter(self.statuses(task_ids).values()))}"]
        except Exception as exc:
            lines = [f"statuses: unreadable ({exc!r})"]
        for process, log in zip(self.processes, self.logs, strict=True):
            kept = [line for line in log.read_text(errors="replace").splitlines() if "gunicorn.access" not in line]
            tail = kept[-40:]
            lines += [f"--- {log.name}: exit status {process.poll()}, last {len(tail)} lines", *tail]
        return "\n".join(lines)

    # -- figures -----------------------------------------------------------------------------------
    def figures(self, scenario: str, tasks: dict[str, str], n: int = 1, note: str = "") -> Figures:
        """Count, and assert the invariants every scenario must keep."""
        prompts = set(tasks.values())
        calls = [call for call in self.upstream.calls if call.prompt in prompts and call.kind != "poll"]
        per_key = Counter(call.key for call in calls)
        with self._engine.connect() as connection:
            rows = {
                row.id: row
                for row in connection.execute(
                    text(
                        "SELECT t.id::text AS id, t.status, t.error_code, t.error_message,"
                        " (SELECT count(*) FROM images i WHERE i.task_id = t.id) AS images,"
                        " (SELECT count(*) FROM attempts a WHERE a.task_id = t.id) AS attempts"
                        " FROM tasks t WHERE t.id::text = ANY(:ids)"
                    ),
                    {"ids": list(tasks)},
                )
            }
        figures = Figures(
            scenario=scenario,
            submitted=len(tasks),
            succeed=sum(row.status == "succeed" for row in rows.values()),
            failed=sum(row.status == "failed" for row in rows.values()),
            lost=len(tasks) - sum(row.status in ("succeed", "failed") for row in rows.values()),
            duplicated=sum(count - 1 for count in per_key.values() if count > 1),
            upstream_calls=len(calls),
            seconds=time.monotonic() - self.started,
            note=note,
            failures=Counter(
                f"{row.error_code}: {row.error_message}" for row in rows.values() if row.status == "failed"
            ),
        )
        figures.report()
        task_of = {prompt: task_id for task_id, prompt in tasks.items()}
        calls_per_task = Counter(task_of[call.prompt] for call in calls)
        for task_id, row in rows.items():
            assert row.status != "succeed" or row.images == n, f"task {task_id}: {row.images} images stored"
            assert calls_per_task[task_id] <= row.attempts, (
                f"task {task_id}: {calls_per_task[task_id]} upstream calls, {row.attempts} recorded attempts"
            )
        assert figures.lost == 0 and figures.duplicated == 0, figures.line()
        return figures
