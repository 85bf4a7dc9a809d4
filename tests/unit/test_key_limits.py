"""Per-key limits without services: the in-memory windows of the embedded mode, how a key's own
limits and the defaults combine, and OpenAI's duration format for the reset headers."""

from __future__ import annotations

import uuid

import pytest

from imagegate.app.key_limits import KeyLimits, MemoryCounters, StoredLimits
from imagegate.app.web.key_limits import openai_duration


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_both_costs_are_taken_or_neither_and_a_window_starts_again_after_its_length():
    clock = Clock()
    counters, key = MemoryCounters(clock), uuid.uuid4()
    limits = KeyLimits(rpm=3, images_per_day=5)
    taken = counters.take(key, limits, 1, 4)
    assert taken.taken and (taken.requests.remaining, taken.images.remaining) == (2, 1)
    assert (taken.requests.reset_ms, taken.images.reset_ms) == (60_000, 86_400_000)

    refused = counters.take(key, limits, 1, 2)  # the requests fit, the images do not: neither is taken
    assert not refused.taken and (refused.requests.remaining, refused.images.remaining) == (2, 1)

    clock.now += 59.5
    assert counters.take(key, limits, 2, 1).requests.remaining == 0
    assert not counters.take(key, limits, 1, 0).taken
    clock.now += 1  # the minute is over; the day is not
    again = counters.take(key, limits, 1, 0)
    assert again.taken and again.requests.remaining == 2 and again.images.remaining == 0
    assert again.requests.reset_ms == 60_000


def test_a_refund_gives_back_what_was_taken_and_a_read_takes_nothing():
    counters, key = MemoryCounters(Clock()), uuid.uuid4()
    limits = KeyLimits(rpm=2)
    verdict = counters.take(key, limits, 2, 7)
    assert verdict.images is None  # that limit is off
    verdict.refund()
    read = counters.take(key, limits, 0, 0)
    assert read.taken and read.requests.remaining == 2
    assert counters.take(key, limits, 0, 0).requests.remaining == 2


def test_keys_have_windows_of_their_own():
    counters = MemoryCounters(Clock())
    limits = KeyLimits(rpm=1)
    assert counters.take(uuid.uuid4(), limits, 1, 0).taken
    assert counters.take(uuid.uuid4(), limits, 1, 0).taken


def test_a_key_s_own_limit_wins_over_the_default_and_its_zero_means_none():
    defaults = KeyLimits(rpm=60, images_per_day=100, max_pending=10)
    assert KeyLimits.of(StoredLimits(), defaults) == defaults
    assert KeyLimits.of(StoredLimits(rpm=0, max_pending=3), defaults) == KeyLimits(0, 100, 3)
    assert not KeyLimits(max_pending=3).counted and KeyLimits(images_per_day=1).counted


@pytest.mark.parametrize(
    ("ms", "text"),
    [(0, "0s"), (250, "250ms"), (1000, "1s"), (1001, "2s"), (59_000, "59s"), (60_000, "1m0s"),
     (360_000, "6m0s"), (3_723_000, "1h2m3s"), (86_400_000, "24h0m0s")],
)  # fmt: skip
def test_reset_durations_are_written_as_openai_writes_them(ms, text):
    assert openai_duration(ms) == text
