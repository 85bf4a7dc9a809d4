"""How many processes `imagegate worker` runs, and which process gevent patches: the console script
decides the second before anything is imported, from the same rule the command uses."""

from __future__ import annotations

import pytest

from imagegate.app.cli import _runs_a_gevent_worker
from imagegate.app.os_limits import usable_cores, worker_processes


def test_the_option_wins_over_the_setting_and_zero_means_a_process_per_core():
    assert worker_processes(3, 1) == 3
    assert worker_processes(None, 2) == 2
    assert worker_processes(None, 0) == worker_processes(0, 5) == usable_cores()


@pytest.mark.parametrize(
    ("argv", "variable", "patched"),
    [
        (["worker", "--processes", "1"], None, True),
        (["worker", "--processes=1"], "4", True),
        (["worker"], "1", True),
        (["worker", "--processes", "2"], None, False),  # the group's parent only waits for its children
        (["worker"], "3", False),
        (["worker", "--processes", "1", "--pool", "threads"], None, False),
        (["api"], "1", False),
    ],
)
def test_gevent_patches_only_a_process_that_runs_the_gevent_pool_itself(monkeypatch, argv, variable, patched):
    if variable is None:
        monkeypatch.delenv("IMAGEGATE_WORKER_PROCESSES", raising=False)
    else:
        monkeypatch.setenv("IMAGEGATE_WORKER_PROCESSES", variable)
    assert _runs_a_gevent_worker(argv) is patched
