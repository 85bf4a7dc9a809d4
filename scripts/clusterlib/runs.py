"""The runs: the same workload with 1, 2 and 3 worker hosts (throughput), and the same workload with
a worker host and then an API host lost in the middle (the zero-loss figures)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from clusterlib.cluster import API_HOSTS, LIMITED_MODEL, MODEL, WORKER_HOSTS, Cluster
from clusterlib.figures import RunFigures, TakeBackWatch, count, wait_ended, wait_webhooks
from clusterlib.workload import Mix, Workload


@dataclass(frozen=True)
class Kills:
    worker_at_s: float = 5.0  # after the workload started
    api_at_s: float = 8.0  # after the workload started, once synchronous requests are waiting


def run_workload(cluster: Cluster, run: str, mix: Mix, during=None, timeout_s: float = 900) -> RunFigures:
    key, key_id = cluster.create_key(run)
    receiver = f"http://{cluster.receiver.host}:{cluster.receiver.port}"
    workload = Workload(cluster.balancer.url, key, (MODEL, LIMITED_MODEL), run, mix, receiver)
    figures = RunFigures(run, len(cluster.worker_names()))
    before, cpu_before = cluster.balancer.servers(), cluster.cpu_s()
    workload.start()
    if during is not None:
        during(cluster, workload, key_id, figures)
    workload.join(timeout_s)
    wait_ended(cluster, key_id, mix.tasks, timeout_s)
    wait_webhooks(cluster, key_id, 120)
    cpu_after = cluster.cpu_s()
    cpu_after |= {name: 0.0 for name in cpu_before if name not in cpu_after}
    count(cluster, key_id, workload, figures)
    # A host lost during the run took its CPU figures with it: None.
    figures.cpu_s = {
        name: round(cpu_after[name] - cpu_before[name], 2) if cpu_after[name] >= cpu_before.get(name, 0.0) else None
        for name in cpu_before
    }
    after = cluster.balancer.servers()
    figures.events["balancer"] = {
        name: {"sessions": server["sessions"] - before.get(name, {}).get("sessions", 0), "status": server["status"]}
        for name, server in after.items()
    }
    figures.events["load_average_1m"] = round(os.getloadavg()[0], 2)
    return figures


def throughput(cluster: Cluster, mix: Mix, say) -> list[RunFigures]:
    results = []
    for hosts in range(1, len(WORKER_HOSTS) + 1):
        cluster.start_workers(WORKER_HOSTS[:hosts])
        say(f"throughput run with {hosts} worker host(s): {mix.tasks} tasks ...")
        figures = run_workload(cluster, f"throughput-{hosts}", mix)
        say(f"  {figures.tasks_per_s:.1f} tasks/s over {figures.seconds:.1f} s; lost {figures.lost}")
        results.append(figures)
    return results


def with_hosts_lost(cluster: Cluster, mix: Mix, kills: Kills, say) -> RunFigures:
    """Every worker host running; one lost at kills.worker_at_s, then the API host holding the more
    connections at kills.api_at_s (once synchronous requests wait on it)."""
    cluster.start_workers(WORKER_HOSTS)
    lost_worker = WORKER_HOSTS[-1]

    def during(cluster: Cluster, workload: Workload, key_id: str, figures: RunFigures) -> None:
        _sleep_until(workload.started + kills.worker_at_s)
        killed_at = time.monotonic()
        processes = cluster.kill_host(lost_worker)
        watch = TakeBackWatch(cluster, key_id, lost_worker, killed_at)
        say(f"  t={killed_at - workload.started:.1f} s: {lost_worker} lost ({processes} processes SIGKILLed, "
            f"eth0 down) while running {len(watch.running)} tasks")  # fmt: skip
        _sleep_until(workload.started + kills.api_at_s)
        deadline = time.monotonic() + 30
        while workload.in_flight("sync") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        servers = cluster.balancer.servers()
        lost_api = max(API_HOSTS, key=lambda name: servers.get(name, {}).get("current", 0))
        waiting = workload.mark_waiting("sync")
        api_killed_at = time.monotonic()
        processes = cluster.kill_host(lost_api)
        say(f"  t={api_killed_at - workload.started:.1f} s: {lost_api} lost ({processes} processes SIGKILLed, "
            f"eth0 down) with {servers.get(lost_api, {}).get('current', 0)} connections; "
            f"{waiting} sync requests waiting in all")  # fmt: skip
        figures.events["api_host_lost"] = {
            "host": lost_api,
            "at_s": round(api_killed_at - workload.started, 1),
            "connections_on_it": servers.get(lost_api, {}).get("current", 0),
            "sync_waiting_in_all": waiting,
        }
        watched.append((watch, round(killed_at - workload.started, 1)))

    watched: list[tuple[TakeBackWatch, float]] = []
    say(f"run with hosts lost: {mix.tasks} tasks, {len(WORKER_HOSTS)} worker hosts, {len(API_HOSTS)} API hosts ...")
    figures = run_workload(cluster, "hosts-lost", mix, during)
    for watch, at_s in watched:
        figures.events["worker_host_lost"] = watch.result() | {"at_s": at_s}
    return figures


def _sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.monotonic()))
