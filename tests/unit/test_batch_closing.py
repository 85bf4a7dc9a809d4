"""workers.batch_closing: one check of a batch at a time, and always one after the last end."""

from __future__ import annotations

import threading
import uuid

from imagegate.workers.batch_closing import BatchClosing


def test_alone_a_touch_checks_at_once():
    checked = []
    closing = BatchClosing(checked.append, recheck_after_s=0)
    batch = uuid.uuid4()
    closing.touched(batch)
    closing.touched(batch)
    assert checked == [batch, batch]


def test_ends_during_a_check_make_one_more_check_after_it():
    batch = uuid.uuid4()
    checks, inside, release = [], threading.Event(), threading.Event()

    def check(batch_id):
        checks.append(batch_id)
        if len(checks) == 1:
            inside.set()
            release.wait(5)

    closing = BatchClosing(check, recheck_after_s=0)
    first = threading.Thread(target=closing.touched, args=(batch,))
    first.start()
    assert inside.wait(5)
    for _ in range(10):  # these return at once: the running check will look again
        closing.touched(batch)
    release.set()
    first.join(5)
    assert checks == [batch, batch]


def test_a_failed_check_does_not_stop_later_ones():
    batch, calls = uuid.uuid4(), []

    def check(batch_id):
        calls.append(batch_id)
        if len(calls) == 1:
            raise RuntimeError("database away")

    closing = BatchClosing(check, recheck_after_s=0)
    try:
        closing.touched(batch)
    except RuntimeError:
        pass
    closing.touched(batch)
    assert calls == [batch, batch]
