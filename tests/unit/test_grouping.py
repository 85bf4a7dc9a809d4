"""app/grouping.py: concurrent calls made in groups, each caller getting its own item's outcome."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from imagegate.app.grouping import Grouped, GroupInterrupted


def _wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


class Recorder:
    """run_many doubling each item; the first group holds until `hold` callers wait behind it."""

    def __init__(self, hold: int = 0, refuse: set[int] | None = None, fail_group: int | None = None):
        self.groups: list[list[int]] = []
        self.hold, self.refuse, self.fail_group = hold, refuse or set(), fail_group
        self.grouped: Grouped[int, int] = Grouped(self.run_many, max_group=8)

    def run_many(self, items: list[int]) -> list[int | BaseException]:
        self.groups.append(items)
        if len(self.groups) == 1 and self.hold:
            _wait_for(lambda: self.grouped.waiting >= self.hold)
        if self.fail_group == len(self.groups):
            raise RuntimeError("the whole group failed")
        return [ValueError(f"refused {item}") if item in self.refuse else item * 2 for item in items]


def _call_all(recorder: Recorder, items: list[int]) -> dict[int, object]:
    def call(item: int):
        try:
            return recorder.grouped(item)
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            return exc

    with ThreadPoolExecutor(len(items)) as pool:
        first = pool.submit(call, items[0])
        _wait_for(lambda: recorder.groups)  # the first call is running, alone
        rest = {item: pool.submit(call, item) for item in items[1:]}
        return {items[0]: first.result(), **{item: future.result() for item, future in rest.items()}}


def test_a_lone_call_runs_at_once_alone():
    recorder = Recorder()
    assert recorder.grouped(21) == 42
    assert recorder.groups == [[21]]


def test_calls_arriving_while_a_group_runs_form_the_next_groups_each_getting_its_own_result():
    recorder = Recorder(hold=20)
    outcomes = _call_all(recorder, list(range(21)))
    assert outcomes == {item: item * 2 for item in range(21)}
    assert recorder.groups[0] == [0]
    assert [len(group) for group in recorder.groups[1:]] == [8, 8, 4]  # max_group bounds a group
    assert sorted(item for group in recorder.groups for item in group) == list(range(21))  # each once


def test_an_outcome_that_is_an_error_is_raised_to_its_caller_alone():
    recorder = Recorder(hold=5, refuse={3})
    outcomes = _call_all(recorder, list(range(6)))
    assert isinstance(outcomes.pop(3), ValueError)
    assert outcomes == {item: item * 2 for item in (0, 1, 2, 4, 5)}


def test_a_failed_group_fails_its_callers_and_the_next_group_still_runs():
    recorder = Recorder(hold=5, fail_group=2)
    outcomes = _call_all(recorder, list(range(6)))
    assert outcomes[0] == 0
    failed = {item for item, outcome in outcomes.items() if isinstance(outcome, RuntimeError)}
    assert failed == set(recorder.groups[1]) and failed
    assert recorder.grouped(7) == 14  # nothing is left holding the lead


def test_a_leader_interrupted_mid_group_releases_its_group_and_hands_over_the_lead():
    entered, release = threading.Event(), threading.Event()

    class Interrupted(BaseException):
        pass

    def run_many(items: list[int]) -> list[int]:
        if items == [0]:
            entered.set()
            release.wait(10)
            raise Interrupted  # as gevent's Timeout or GreenletExit would
        return [item * 2 for item in items]

    grouped: Grouped[int, int] = Grouped(run_many, max_group=8)
    with ThreadPoolExecutor(4) as pool:

        def lead():
            with pytest.raises(Interrupted):
                grouped(0)

        leader = pool.submit(lead)
        assert entered.wait(10)
        waiting = [pool.submit(grouped, item) for item in (1, 2, 3)]
        _wait_for(lambda: grouped.waiting == 3)
        release.set()
        leader.result(10)
        assert [future.result(10) for future in waiting] == [2, 4, 6]  # they were never in its group


def test_callers_in_an_interrupted_group_are_told_so_rather_than_left_waiting():
    class Interrupted(BaseException):
        pass

    entered, hold = threading.Event(), threading.Event()

    def run_many(items: list[int]) -> list[int]:
        if 0 in items and len(items) > 1:
            raise Interrupted  # the leader (0) of the group (0, 1) is interrupted
        if items == [9]:
            entered.set()
            hold.wait(10)
        return [item * 2 for item in items]

    grouped: Grouped[int, int] = Grouped(run_many, max_group=8)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(grouped, 9)
        assert entered.wait(10)
        others = [pool.submit(grouped, 0)]
        _wait_for(lambda: grouped.waiting == 1)
        others.append(pool.submit(grouped, 1))
        _wait_for(lambda: grouped.waiting == 2)
        hold.set()
        assert first.result(10) == 18
        outcomes = []
        for future in others:
            try:
                outcomes.append(future.result(10))
            except BaseException as exc:  # noqa: BLE001
                outcomes.append(type(exc))
        # The second group's leader (0, the first to wait) got its own interruption; 1 was told.
        assert outcomes == [Interrupted, GroupInterrupted]
