"""scripts/cluster in its reduced form: 2 API hosts behind HAProxy, 3 worker hosts and a sweeper,
each in a network namespace of its own; a worker host and then an API host are lost in the middle of
a mixed workload (sync, async with webhooks, a batch, a model with per-model limits). Nothing accepted
may be lost, no attempt may call the upstream twice (counted at the fake upstream by Idempotency-Key),
and the model's max_concurrency and rpm hold across the hosts.

Needs root and iproute2: CI runs as root. Without them this test fails (it is not skipped)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QUICK_TASKS = 60 + 60 + 300 + 40  # scripts/cluster --quick: sync, async, batch lines, on the limited model


@pytest.mark.e2e
def test_losing_a_worker_host_and_an_api_host_loses_nothing_and_repeats_no_call(tmp_path):
    assert os.geteuid() == 0 and shutil.which("ip"), (
        "this test builds network namespaces: run it as root with iproute2 installed (CI does)"
    )
    figures_file = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "cluster"), "--quick", "--json", str(figures_file)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    output = done.stdout[-6000:] + done.stderr[-4000:]
    assert figures_file.exists(), output
    run = json.loads(figures_file.read_text())["hosts_lost"]

    # Every request was accepted (after retries through the balancer) and every task succeeded.
    assert run["accepted"] == QUICK_TASKS and run["client_unanswered"] == 0, output
    assert run["client_ids_missing"] == 0, output
    assert (run["succeed"], run["failed"], run["lost"]) == (QUICK_TASKS, 0, 0), output
    # No attempt called the upstream twice; every task was called at least once.
    assert run["duplicate_calls"] == 0 and run["tasks_over_attempts"] == 0, output
    assert run["upstream_calls"] >= QUICK_TASKS, output
    assert run["batches_open"] == 0, output
    assert run["webhooks_delivered"] == run["webhooks_expected"] == 60 + 1, output

    worker = run["events"]["worker_host_lost"]
    assert worker["running_on_it"] > 0, output  # it was lost with work in hand ...
    assert worker["taken_back_s"] is not None and worker["claimed_again_s"] is not None, output  # ... taken back
    assert run["extra_attempts"] >= worker["running_on_it"], output

    api = run["events"]["api_host_lost"]
    assert run["events"]["balancer"][api["host"]]["status"] != "UP", output
    # Synchronous requests were waiting on the lost API host; each found its task again.
    assert run["sync_on_lost_host"] >= 1, output
    assert run["sync_found"] == run["sync_on_lost_host"], output
    # The limited model's max_concurrency and rpm held across all the hosts, at the fake upstream's count.
    limits = run["limits"]
    assert limits["calls"] >= 40, output
    assert 1 <= limits["peak_in_flight"] <= limits["max_concurrency"], output
    assert limits["most_in_60_s"] <= limits["rpm"], output
    assert done.returncode == 0, output
