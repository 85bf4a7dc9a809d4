"""The figures, printed: one table of the runs, the throughput ratios, what the lost hosts cost."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def zero_loss(results: dict) -> bool:
    runs = results.get("throughput", []) + ([results["hosts_lost"]] if "hosts_lost" in results else [])
    return all(run["zero_loss"] and run["limits_held"] for run in runs)


def show(results: dict, options, mix) -> None:
    console = Console(width=200)
    ideal_per_host = options.concurrency / options.latency_s
    table = Table(
        title=(
            f"{mix.tasks} tasks a run ({mix.batch_lines}-line batch, {mix.asynchronous} async with webhooks, "
            f"{mix.sync} sync by {mix.sync_clients} clients, {mix.limited} async on a model with limits); "
            f"worker --concurrency {options.concurrency}, "
            f"upstream {options.latency_s:g} s, lease {options.lease_s:g} s"
        )
    )
    for column in ("run", "worker hosts", "tasks/s", "of C/L", "seconds", "accepted", "succeed", "failed", "lost",
                   "dup. calls", "extra attempts", "webhooks", "worker CPU ms/task", "busiest worker",
                   "load 1m"):  # fmt: skip
        table.add_column(column, justify="left" if column == "run" else "right")
    runs = results.get("throughput", []) + ([results["hosts_lost"]] if "hosts_lost" in results else [])
    for run in runs:
        ideal = ideal_per_host * run["worker_hosts"]
        table.add_row(
            run["run"],
            str(run["worker_hosts"]),
            f"{run['tasks_per_s']:.1f}",
            f"{run['tasks_per_s'] / ideal:.0%}" if ideal and run["run"].startswith("throughput") else "",
            f"{run['seconds']:.1f}",
            str(run["accepted"]),
            str(run["succeed"]),
            str(run["failed"]),
            str(run["lost"]),
            str(run["duplicate_calls"]),
            str(run["extra_attempts"]),
            f"{run['webhooks_delivered']}/{run['webhooks_expected']}",
            *_worker_cpu(run),
            str(run["events"].get("load_average_1m", "")),
        )
    console.print(table)
    throughput = results.get("throughput", [])
    if len(throughput) > 1 and throughput[0]["tasks_per_s"]:
        one = throughput[0]["tasks_per_s"]
        ratios = ", ".join(
            f"{run['worker_hosts']} hosts / 1 = {run['tasks_per_s'] / one:.2f} (ideal {run['worker_hosts']})"
            for run in throughput[1:]
        )
        console.print(f"throughput ratio: {ratios}")
    if runs and runs[-1]["limits"]:
        limits = runs[-1]["limits"]
        held = "held" if all(run["limits_held"] for run in runs) else "[red]NOT HELD[/]"
        console.print(
            f"per-model limits of {limits['model']} ({mix.limited} tasks a run) {held} across every host, counted at "
            f"the fake upstream: at most {limits['peak_in_flight']} calls in flight (max_concurrency "
            f"{limits['max_concurrency']}), at most {limits['most_in_60_s']} calls arriving within 60 s (rpm "
            f"{limits['rpm']}), {limits['calls']} calls in all"
        )
    lost = results.get("hosts_lost")
    if lost:
        worker = lost["events"].get("worker_host_lost", {})
        api = lost["events"].get("api_host_lost", {})
        console.print(
            f"worker host {worker.get('host')} lost at t={worker.get('at_s')} s while running "
            f"{worker.get('running_on_it')} tasks: none running there {_seconds(worker.get('taken_back_s'))} later "
            f"(the sweeper took them back), all claimed again or ended after {_seconds(worker.get('claimed_again_s'))}"
        )
        console.print(
            f"API host {api.get('host')} lost at t={api.get('at_s')} s holding {api.get('connections_on_it')} "
            f"connections; of {lost['sync_waiting']} sync requests waiting, {lost['sync_on_lost_host']} were on it: "
            f"{lost['sync_cut']} cut and sent again by their client, {lost['sync_resent_by_balancer']} sent again by "
            f"HAProxy, all with their Idempotency-Key; {lost['sync_replayed']} answered with the task already "
            f"accepted, {lost['sync_found']} read succeed by id; "
            f"{lost['client_unanswered']} requests never accepted, {lost['client_ids_missing']} accepted ids missing"
        )
        console.print(f"balancer sessions per API host: {lost['events'].get('balancer')}")
        verdict = "[green]zero loss" if lost["zero_loss"] else "[red]LOSS OR DUPLICATE"
        console.print(
            f"{verdict}[/]: {lost['succeed']} of {lost['accepted']} succeed, {lost['lost']} lost, "
            f"{lost['duplicate_calls']} upstream calls repeated within an attempt "
            f"({lost['upstream_calls']} calls), {lost['tasks_over_attempts']} tasks with more calls than attempts; "
            f"webhooks {lost['webhooks_delivered']}/{lost['webhooks_expected']} delivered "
            f"({lost['webhooks_repeated']} delivered again), {lost['batches_open']} batches left open"
        )
        for why, count in lost["failures"].items():
            console.print(f"  failed {count}x {why}")


def _worker_cpu(run: dict) -> tuple[str, str]:
    """Worker processes' CPU per task, and the busiest worker host's share of one core."""
    used = [seconds for name, seconds in run["cpu_s"].items() if name.startswith("worker") and seconds]
    if not used or not run["accepted"] or not run["seconds"]:
        return "", ""
    return f"{1000 * sum(used) / run['accepted']:.1f}", f"{max(used) / run['seconds']:.0%} of a core"


def _seconds(value) -> str:
    return f"{value:.1f} s" if isinstance(value, int | float) else "never (within 10 min)"
