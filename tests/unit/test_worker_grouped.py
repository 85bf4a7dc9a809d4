"""workers/grouped.py: writes made in groups by a pool of writers, each caller getting its own result;
and an attempt's final write whose writer was interrupted, made again (workers/durable_writes.py)."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import Future
from types import SimpleNamespace

import pytest

from imagegate.app.grouping import GroupInterrupted
from imagegate.workers.durable_writes import DurableWrites
from imagegate.workers.grouped import Grouped


class Interrupted(BaseException):
    """As gevent's Timeout or GreenletExit would be: not an Exception."""


def _in_background(grouped: Grouped, item: int) -> Future:
    """The call on a daemon thread: a caller left waiting fails the test instead of hanging it."""
    future: Future = Future()

    def call() -> None:
        try:
            future.set_result(grouped(item))
        except BaseException as exc:  # noqa: BLE001 - the outcome under test
            future.set_exception(exc)

    threading.Thread(target=call, daemon=True).start()
    return future


def test_callers_of_an_interrupted_writer_are_told_so_and_later_calls_are_still_written():
    entered, release = threading.Event(), threading.Event()
    groups: list[list[int]] = []

    def write_many(items: list[int]) -> list[int]:
        groups.append(items)
        if len(groups) == 1:
            entered.set()
            release.wait(10)
        if len(groups) == 2:
            raise Interrupted
        return [item * 2 for item in items]

    grouped: Grouped[int, int] = Grouped(write_many, name="test", max_group=3, writers=1)
    first = _in_background(grouped, 0)
    assert entered.wait(10)
    # While the lone writer holds the first group, six calls queue: the next group (three of them)
    # is interrupted, and the three behind it need a writer that is still alive.
    queued = {item: _in_background(grouped, item) for item in range(1, 7)}
    deadline = time.monotonic() + 10
    while grouped._queue.qsize() < 6:
        assert time.monotonic() < deadline, "the calls never queued"
        time.sleep(0.005)
    release.set()
    assert first.result(10) == 0
    for item, future in queued.items():
        if item in groups[1]:
            with pytest.raises(GroupInterrupted):
                future.result(10)
        else:
            assert future.result(10) == item * 2
    assert sorted(len(group) for group in groups[1:]) == [3, 3]
    assert grouped(7) == 14


class LeaseHeld:
    def valid_for_s(self, claim) -> float:
        return 30.0


def test_a_success_whose_writer_was_interrupted_is_written_once_by_the_next_writer():
    """The upstream has answered and been paid: the final write goes to a new writer while the lease
    holds, instead of being dropped and bought again once the lease expires."""
    groups: list[list[str]] = []

    def write_many(items: list[str]) -> list[str]:
        groups.append(items)
        if len(groups) == 1:
            raise Interrupted
        return [f"{item} written" for item in items]

    successes: Grouped[str, str] = Grouped(write_many, name="successes", writers=1)
    durable = DurableWrites(store=None, leases=LeaseHeld(), image_store=None)  # type: ignore[arg-type]
    claim = SimpleNamespace(task_id=uuid.uuid4(), attempt=1)
    assert durable.write(claim, successes, "success") == "success written"  # type: ignore[arg-type]
    assert groups == [["success"], ["success"]]  # tried by the interrupted writer, written by the next
