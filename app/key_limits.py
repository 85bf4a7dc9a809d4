"""Per-key limits at intake: requests per minute, images per day, tasks pending or running at once.

Requests and images are counted in fixed windows that start at a key's first counted request (a
minute; a day), in Redis so that every API replica shares them: one Lua script checks both
windows and takes both costs, or neither, atomically. The embedded mode (no Redis; one API
process) counts the same way in memory.

Tasks pending or running are counted in Postgres, not in a Redis counter: the tasks table is the
truth, so nothing has to be decremented when a task ends (a worker killed after ending a task, the
sweeper failing one, a cancel) and nothing drifts after a crash. Intake locks the key's row for the
rest of its transaction (FOR NO KEY UPDATE; on SQLite, a write that takes the database's write
lock), counts, and inserts: two replicas cannot both see the last free place.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import Connection, func, select, update

from imagegate.app.models import ApiKey, Task
from imagegate.app.settings import Settings
from imagegate.app.state.tasks import UNFINISHED

log = logging.getLogger(__name__)

MINUTE_MS, DAY_MS = 60_000, 86_400_000


@dataclass(frozen=True)
class StoredLimits:
    """A key's own limits as stored: None follows the settings' default, 0 is no limit."""

    rpm: int | None = None
    images_per_day: int | None = None
    max_pending: int | None = None


NO_OWN_LIMITS = StoredLimits()


@dataclass(frozen=True)
class KeyLimits:
    """The limits in force for a key (its own, else the defaults); 0 is no limit."""

    rpm: int = 0
    images_per_day: int = 0
    max_pending: int = 0

    @classmethod
    def defaults(cls, settings: Settings) -> KeyLimits:
        return cls(settings.default_rpm, settings.default_images_per_day, settings.default_max_pending)

    @classmethod
    def of(cls, stored: StoredLimits, defaults: KeyLimits) -> KeyLimits:
        return cls(
            rpm=defaults.rpm if stored.rpm is None else stored.rpm,
            images_per_day=defaults.images_per_day if stored.images_per_day is None else stored.images_per_day,
            max_pending=defaults.max_pending if stored.max_pending is None else stored.max_pending,
        )

    @property
    def counted(self) -> bool:
        """True when requests or images are counted in windows (Redis or memory)."""
        return bool(self.rpm or self.images_per_day)


@dataclass(frozen=True)
class Window:
    """One limit's window as it stands: its limit, how much of it is used, when it starts again."""

    limit: int
    used: int
    reset_ms: int

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)


@dataclass(frozen=True)
class Verdict:
    """What a take found: whether both costs were taken, and the windows as they stand after it
    (None for a limit that is off)."""

    taken: bool
    requests: Window | None
    images: Window | None
    refund: Callable[[], None]


def _nothing() -> None:
    pass


# Called inside intake's transaction, after an Idempotency-Key replay was ruled out and before the
# task is inserted: raises to refuse (the transaction rolls back: nothing is stored), else returns
# what gives the counts back should the transaction not commit.
Admit = Callable[[Connection], Callable[[], None]]


class Admission:
    """Runs `admit` inside a store's transaction and gives its counts back if the transaction then
    fails: `with Admission(admit) as admission, engine.begin() as connection: admission.run(connection)`
    (the transaction ends first, so a failed commit is seen here too)."""

    def __init__(self, admit: Admit | None):
        self._admit, self._refund = admit, _nothing

    def run(self, connection: Connection) -> None:
        if self._admit is not None:
            self._refund = self._admit(connection)

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is not None:
            self._refund()


class Counters(Protocol):
    def take(self, key_id: uuid.UUID, limits: KeyLimits, requests: int, images: int) -> Verdict: ...


# KEYS: the requests window, the images window. ARGV: for each, its limit (0: off), the cost to
# take, and its length in ms. Takes both costs or neither. Returns {taken, requests used, requests
# reset in ms, images used, images reset in ms}.
_TAKE = """
local taken = 1
local state = {}
for i = 1, 2 do
  local limit, cost = tonumber(ARGV[i * 3 - 2]), tonumber(ARGV[i * 3 - 1])
  local used = tonumber(redis.call('GET', KEYS[i]) or '0')
  state[i] = {limit, cost, used}
  if limit > 0 and used + cost > limit then taken = 0 end
end
local reply = {taken}
for i = 1, 2 do
  local limit, cost, used = state[i][1], state[i][2], state[i][3]
  if taken == 1 and limit > 0 and cost > 0 then
    used = redis.call('INCRBY', KEYS[i], cost)
    if redis.call('PTTL', KEYS[i]) < 0 then redis.call('PEXPIRE', KEYS[i], ARGV[i * 3]) end
  end
  local ttl = redis.call('PTTL', KEYS[i])
  if ttl < 0 then ttl = 0 end
  reply[#reply + 1] = used
  reply[#reply + 1] = ttl
end
return reply
"""

# KEYS: the two windows; ARGV: the costs to give back. A window that has ended is left alone.
_REFUND = """
for i = 1, 2 do
  local cost = tonumber(ARGV[i])
  if cost > 0 and redis.call('EXISTS', KEYS[i]) == 1 then
    if redis.call('DECRBY', KEYS[i], cost) < 0 then redis.call('SET', KEYS[i], 0, 'KEEPTTL') end
  end
end
return 1
"""


def _windows(limits: KeyLimits, reply: list[int]) -> tuple[Window | None, Window | None]:
    requests = Window(limits.rpm, int(reply[1]), int(reply[2])) if limits.rpm else None
    images = Window(limits.images_per_day, int(reply[3]), int(reply[4])) if limits.images_per_day else None
    return requests, images


class RedisCounters:
    """The windows of every key, in the Redis every API replica uses. Redis away: requests are
    let through uncounted (logged), as the tasks wait in Postgres for the broker anyway."""

    def __init__(self, redis_url: str):
        import redis  # here, so the embedded mode never needs a Redis client

        # Short timeouts: every authenticated request reads its windows; a Redis outage must not stall them.
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self._take = self._redis.register_script(_TAKE)
        self._refund = self._redis.register_script(_REFUND)

    @staticmethod
    def _keys(key_id: uuid.UUID) -> list[str]:
        return [f"imagegate:key-limits:{key_id}:requests", f"imagegate:key-limits:{key_id}:images"]

    def take(self, key_id: uuid.UUID, limits: KeyLimits, requests: int, images: int) -> Verdict:
        """Take `requests` and `images` from the key's windows if both fit; (0, 0) only reads them."""
        keys = self._keys(key_id)
        args = [limits.rpm, requests, MINUTE_MS, limits.images_per_day, images, DAY_MS]
        try:
            reply = self._take(keys=keys, args=args)
        except Exception as exc:
            log.warning("per-key limits unavailable, request let through uncounted: %s", type(exc).__name__)
            return Verdict(True, None, None, _nothing)
        taken = bool(int(reply[0]))

        def refund() -> None:
            try:
                self._refund(keys=keys, args=[requests if limits.rpm else 0, images if limits.images_per_day else 0])
            except Exception as exc:
                log.warning("per-key limits: a refused request's count not given back: %s", type(exc).__name__)

        return Verdict(taken, *_windows(limits, reply), refund=refund if taken and (requests or images) else _nothing)


class MemoryCounters:
    """The same windows in this process alone: the embedded mode, whose one API process serves every
    request. A lock makes check-and-take one step for greenlets and threads alike."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._windows: dict[tuple[uuid.UUID, str], tuple[int, float]] = {}  # -> (used, ends at)
        self._lock = threading.Lock()

    def _used(self, key: tuple[uuid.UUID, str], now: float) -> tuple[int, float]:
        used, ends_at = self._windows.get(key, (0, now))
        return (used, ends_at) if ends_at > now else (0, now)

    def take(self, key_id: uuid.UUID, limits: KeyLimits, requests: int, images: int) -> Verdict:
        wanted = [("requests", limits.rpm, requests, MINUTE_MS), ("images", limits.images_per_day, images, DAY_MS)]
        with self._lock:
            now = self._clock()
            state = [self._used((key_id, name), now) for name, *_ in wanted]
            pairs = list(zip(wanted, state, strict=True))
            taken = all(not limit or used + cost <= limit for (_, limit, cost, _), (used, _) in pairs)
            reply = [int(taken)]
            for (name, limit, cost, window_ms), (used, ends_at) in pairs:
                if taken and limit and cost:
                    ends_at = ends_at if used else now + window_ms / 1000
                    used += cost
                    self._windows[(key_id, name)] = (used, ends_at)
                reply += [used, max(0, round((ends_at - now) * 1000))]

        def refund() -> None:
            with self._lock:
                for name, limit, cost, _ in wanted:
                    found = self._windows.get((key_id, name))
                    if limit and cost and found:
                        self._windows[(key_id, name)] = (max(0, found[0] - cost), found[1])

        return Verdict(taken, *_windows(limits, reply), refund=refund if taken and (requests or images) else _nothing)


def make_counters(redis_url: str | None) -> Counters:
    return RedisCounters(redis_url) if redis_url else MemoryCounters()


def lock_key_for_intake(connection: Connection, key_id: uuid.UUID) -> None:
    """Hold the key's intake until this transaction ends: concurrent submits of one key, on any
    replica, count its unfinished tasks one after another."""
    if connection.dialect.name == "sqlite":  # no row locks: a write takes the database's write lock
        connection.execute(update(ApiKey).where(ApiKey.id == key_id).values(max_pending=ApiKey.max_pending))
        return
    connection.execute(select(ApiKey.id).where(ApiKey.id == key_id).with_for_update(key_share=True))


def count_unfinished(connection: Connection, key_id: uuid.UUID, up_to: int) -> int:
    """The key's tasks pending or running, counted up to `up_to` (enough to decide; the partial
    index ix_tasks_unfinished_api_key makes it a short index scan)."""
    found = select(Task.id).where(Task.api_key_id == key_id, Task.status.in_(UNFINISHED)).limit(up_to).subquery()
    return connection.execute(select(func.count()).select_from(found)).scalar_one()
