"""Task ends announced in groups (workers/announcements.py): every end queued is sent, in order, in
as few calls as arrive together, each with the reply handed over with it, and a failed send is
logged, not raised, and does not stop later ones."""

from __future__ import annotations

import threading
import time

from imagegate.workers.announcements import MAX_GROUP_BYTES, GroupedAnnouncements


class Recorded:
    def __init__(self, fail_first: bool = False):
        self.groups: list[list[str]] = []
        self.replies: list[dict[str, bytes]] = []
        self.fail_first = fail_first
        self.gate = threading.Event()

    def announce_many(self, task_ids: list[str], replies=None) -> None:
        self.gate.wait(5)
        if self.fail_first and not self.groups:
            self.groups.append([])
            raise ConnectionError("redis away")
        self.groups.append(list(task_ids))
        self.replies.append(dict(replies or {}))


def wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_ends_queued_while_a_send_is_under_way_go_in_one_group():
    recorded = Recorded()
    announcements = GroupedAnnouncements(recorded)
    announcements.announce("t0")  # taken at once; its send waits on the gate
    time.sleep(0.05)
    for index in range(1, 101):
        announcements.announce(f"t{index}")
    recorded.gate.set()
    wait_for(lambda: sum(len(group) for group in recorded.groups) == 101)
    assert [task_id for group in recorded.groups for task_id in group] == [f"t{index}" for index in range(101)]
    assert len(recorded.groups) == 2


def test_a_failed_send_is_logged_and_later_ends_are_still_sent(caplog):
    recorded = Recorded(fail_first=True)
    recorded.gate.set()
    announcements = GroupedAnnouncements(recorded)
    announcements.announce("lost")
    wait_for(lambda: len(recorded.groups) == 1)
    announcements.announce("next")
    wait_for(lambda: len(recorded.groups) == 2)
    assert recorded.groups[1] == ["next"]
    assert "could not announce the end of 1 task(s): redis away" in caplog.text


def test_a_reply_goes_with_its_end_and_replies_past_the_byte_cap_start_a_new_group():
    recorded = Recorded()
    announcements = GroupedAnnouncements(recorded)
    announcements.announce("t0")  # taken at once; its send waits on the gate
    time.sleep(0.05)
    big = b"x" * (MAX_GROUP_BYTES // 2 + 1)
    announcements.announce("t1", big)
    announcements.announce("t2")
    announcements.announce("t3", big)
    announcements.announce("t4", b"small")
    recorded.gate.set()
    wait_for(lambda: sum(len(group) for group in recorded.groups) == 5)
    assert recorded.groups == [["t0"], ["t1", "t2", "t3"], ["t4"]]
    assert recorded.replies == [{}, {"t1": big, "t3": big}, {"t4": b"small"}]
