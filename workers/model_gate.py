"""Per-model upstream limits kept in Redis, so every worker process on every host keeps them together.

Per model, under one hash tag (a Redis Cluster keeps them in one slot):
- `holders`: a sorted set of the upstream calls in flight, scored by their lease's end. A worker that
  dies stops renewing, and its calls leave the set once their lease ends (`max_concurrency`).
- `calls`: a sorted set of the calls started in the last 60 s, scored by when (`rpm`, a sliding window).
- `line`, `line_expiry`, `line_need`: the tasks waiting for room, oldest task first (scored by when the
  task was accepted), each with how many calls it needs and when its place lapses if it stops asking.
  A task is let in only if the room left also covers every task ahead of it in the line: a task
  needing four calls is not passed forever by tasks needing one.
- `slow` (the lowered rate), `pause` and `burst`: what a 429 left behind, once per burst of them.
  Only a model with an `rpm` has its rate halved: halving the calls merely seen in the last minute
  made a burst of 429s stop a model for the whole next minute. Any model is paused for Retry-After;
  once per burst, or sporadic 429s would each pause every task in turn, one task every Retry-After.

Why a script and not the `limits` library: taking a concurrency slot, a rate token and one's place in
the line must succeed or fail together (a token taken for an attempt that then finds no slot would be
lost for the minute), and the line and the 429 slow-down are not what `limits` offers. Every script
reads the time from Redis (TIME), so the hosts' clocks do not have to agree.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from imagegate.app.state.tasks import QueuedReason

# rpm: calls per minute, counted over 61 s: a call is counted here when it is let in and by the
# upstream when it arrives, a connect later; the margin keeps the upstream's minute, not only ours.
WINDOW_S = 61.0

_PRELUDE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local function extend(key, ms)  -- a key lives at least ms longer (never shortened)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
"""

# KEYS: holders, calls, line, line_expiry, line_need, slow, pause
# ARGV: task, member prefix, calls needed, max_concurrency (0: none), rpm (0: none), lease ms,
#       place in line (the task's acceptance, ms), base wait ms, window ms
# Returns {1, slots held} or {0, reason, wait ms, position in line}.
ACQUIRE = (
    _PRELUDE
    + """
local holders, calls_key, line, line_expiry, line_need, slow, pause = unpack(KEYS)
local task, prefix = ARGV[1], ARGV[2]
local calls, max_conc, rpm = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local lease, place, base_wait, window = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])

redis.call('ZREMRANGEBYSCORE', holders, '-inf', now)
redis.call('ZREMRANGEBYSCORE', calls_key, '-inf', now - window)
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', line_expiry, '-inf', now)) do
  redis.call('ZREM', line, gone)
  redis.call('ZREM', line_expiry, gone)
  redis.call('HDEL', line_need, gone)
end

local rate = rpm
local slowed = tonumber(redis.call('GET', slow) or '0')
if slowed > 0 and (rate == 0 or slowed < rate) then rate = slowed end
local paused = redis.call('PTTL', pause)

local function slots(n)
  if max_conc > 0 then return math.min(n, max_conc) end
  return 0
end

local function admitted()
  redis.call('ZREM', line, task)
  redis.call('ZREM', line_expiry, task)
  redis.call('HDEL', line_need, task)
  local held = slots(calls)
  for i = 1, held do redis.call('ZADD', holders, now + lease, prefix .. 'h' .. i) end
  if held > 0 then extend(holders, lease + 1000) end
  for i = 1, calls do redis.call('ZADD', calls_key, now, prefix .. 'c' .. i) end
  extend(calls_key, window + 1000)
  return {1, held}
end

if max_conc == 0 and rate == 0 and paused <= 0 then return admitted() end

-- Take (or keep) a place in the line, then add up what the tasks ahead need. Each needs at least
-- one call, so past the first `bound` of them there can be no room left for this one anyway.
redis.call('ZADD', line, place, task)
redis.call('HSET', line_need, task, calls)
local ahead_slots, ahead_calls = 0, 0
local bound = math.max(max_conc, rate, 1)
for _, member in ipairs(redis.call('ZRANGE', line, 0, bound)) do
  if member == task then break end
  local need = tonumber(redis.call('HGET', line_need, member) or '1')
  ahead_slots = ahead_slots + slots(need)
  ahead_calls = ahead_calls + need
end

local reason, wait = false, 0
local position = redis.call('ZRANK', line, task)
if paused > 0 then
  reason, wait = 'model_rate_limit', paused
elseif max_conc > 0 and redis.call('ZCARD', holders) + ahead_slots + slots(calls) > max_conc then
  -- nobody knows when a call ends: ask again soon, later the further back in the line
  reason, wait = 'model_concurrency_limit', base_wait * (1 + math.min(math.floor(position / max_conc), 9))
elseif rate > 0 then
  local recent = redis.call('ZCARD', calls_key)
  local excess = recent + ahead_calls + calls - rate
  if excess > 0 then
    reason = 'model_rate_limit'
    if excess <= recent then  -- room comes when the excess-th oldest call leaves the window
      local oldest = redis.call('ZRANGE', calls_key, excess - 1, excess - 1, 'WITHSCORES')
      wait = math.max(tonumber(oldest[2]) + window - now, 1)
    elseif calls > rate then  -- more than a slowed-down minute holds: wait the slow-down out
      wait = math.max(redis.call('PTTL', slow), base_wait)
    else  -- the tasks ahead take this minute's room
      wait = window
    end
  end
end
if not reason then return admitted() end

local keep = wait + math.max(math.floor(wait / 2), 2000)  -- the place lapses if not asked for again
redis.call('ZADD', line_expiry, now + keep, task)
extend(line, keep + 1000)
extend(line_expiry, keep + 1000)
extend(line_need, keep + 1000)
return {0, reason, wait, position}
"""
)

# KEYS: holders. ARGV: lease ms, members... Members no longer held (their lease ended) stay gone.
RENEW = (
    _PRELUDE
    + """
local lease = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + lease, ARGV[i]) end
extend(KEYS[1], lease + 1000)
return 1
"""
)

# KEYS: slow, pause, burst. ARGV: rpm (0: none), cooldown ms, Retry-After ms (0: none), burst ms.
# At most once a burst (the calls in flight when the first 429 came get theirs too, and so do the
# first calls after a pause): a model with an rpm has it halved (or its lowered rate halved again)
# for the cooldown, and any model is paused for Retry-After. Each task that got a 429 waits out its
# own Retry-After besides (its retry's backoff). Returns the lowered rate (0: none).
THROTTLE = (
    _PRELUDE
    + """
local slow, pause, burst_key = unpack(KEYS)
local rpm, cooldown, retry_after, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local current = tonumber(redis.call('GET', slow) or '0')
if not redis.call('SET', burst_key, '1', 'PX', burst, 'NX') then return current end
if rpm > 0 then
  if current == 0 then current = rpm end
  current = math.max(1, math.floor(current / 2))
  redis.call('SET', slow, current, 'PX', cooldown)
end
if retry_after > 0 and redis.call('PTTL', pause) < retry_after then
  redis.call('SET', pause, '1', 'PX', retry_after)
end
return current
"""
)

# A 429 within this long of the one that lowered the rate or paused the model belongs to its burst.
BURST_S = 10.0


@dataclass(frozen=True)
class Ask:
    """What one attempt asks of its model: room for `calls` upstream calls."""

    model: str
    task: str  # its place in the model's line
    calls: int
    max_concurrency: int | None
    rpm: int | None
    accepted_ms: int  # the task's acceptance: older tasks first
    lease_s: float  # a slot not renewed within this comes back
    wait_s: float  # the base wait for a concurrency slot


@dataclass(frozen=True)
class Granted:
    """Room given: the concurrency slots held (none when the model has no max_concurrency)."""

    model: str
    holders: tuple[str, ...]

    @property
    def slots(self) -> int:
        return len(self.holders)


@dataclass(frozen=True)
class NoRoom:
    reason: QueuedReason
    wait_s: float
    position: int  # tasks ahead in the model's line


def _answer(ask: Ask, prefix: str, reply: list) -> Granted | NoRoom:
    if int(reply[0]) == 1:
        return Granted(ask.model, tuple(f"{prefix}h{index}" for index in range(1, int(reply[1]) + 1)))
    reason = reply[1].decode() if isinstance(reply[1], bytes) else reply[1]
    return NoRoom(QueuedReason(reason), int(reply[2]) / 1000, int(reply[3]))


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class RedisModelGate:
    def __init__(self, client: redis.Redis, prefix: str = "imagegate:model:", window_s: float = WINDOW_S) -> None:
        self._client = client
        self._prefix = prefix
        self._window_ms = _ms(window_s)
        self._acquire = client.register_script(ACQUIRE)
        self._renew = client.register_script(RENEW)
        self._throttle = client.register_script(THROTTLE)

    def _key(self, model: str, name: str) -> str:
        return f"{self._prefix}{{{model}}}:{name}"

    def acquire(self, ask: Ask) -> Granted | NoRoom:
        return self.acquire_many([ask])[0]

    def acquire_many(self, asks: list[Ask]) -> list[Granted | NoRoom]:
        """Each ask's answer, in order, from one round trip: a claim group's asks are pipelined
        (each script runs alone and atomically; the pipeline only saves the round trips)."""
        calls = []
        for ask in asks:
            keys = [
                self._key(ask.model, name)
                for name in ("holders", "calls", "line", "line_expiry", "line_need", "slow", "pause")
            ]
            prefix = f"{ask.task}:{uuid.uuid4().hex[:12]}:"
            args = [
                ask.task,
                prefix,
                ask.calls,
                ask.max_concurrency or 0,
                ask.rpm or 0,
                _ms(ask.lease_s),
                ask.accepted_ms,
                _ms(ask.wait_s),
                self._window_ms,
            ]
            calls.append((prefix, [len(keys), *keys, *args]))
        replies = self._evalsha_all(self._acquire, [call for _, call in calls])
        return [_answer(ask, prefix, reply) for ask, (prefix, _), reply in zip(asks, calls, replies, strict=True)]

    def _evalsha_all(self, script: Script, calls: list[list]) -> list:
        """EVALSHA of each call in one pipeline; a server that lost the script (a restart, SCRIPT
        FLUSH) has it loaded and the refused calls sent again, as redis-py's Script does alone.
        Not redis-py's pipelined Script: it asks SCRIPT EXISTS first, a second round trip."""
        replies: list = [None] * len(calls)
        todo = list(range(len(calls)))
        for _ in range(2):
            pipe = self._client.pipeline(transaction=False)
            for index in todo:
                pipe.evalsha(script.sha, *calls[index])
            answered = pipe.execute(raise_on_error=False)
            lost = []
            for index, reply in zip(todo, answered, strict=True):
                if isinstance(reply, NoScriptError):
                    lost.append(index)
                elif isinstance(reply, Exception):  # a bug in the script: the whole group is refused, and
                    raise reply  # the room the others took comes back when its leases end
                else:
                    replies[index] = reply
            if not lost:
                return replies
            self._client.script_load(script.script)
            todo = lost
        raise NoScriptError("the model gate's script could not be loaded")

    def release(self, granted: Granted) -> None:
        if granted.holders:
            self._client.zrem(self._key(granted.model, "holders"), *granted.holders)

    def renew(self, model: str, holders: list[str], lease_s: float) -> None:
        if holders:
            self._renew(keys=[self._key(model, "holders")], args=[_ms(lease_s), *holders])

    def throttled(self, model: str, rpm: int | None, cooldown_s: float, retry_after_s: float | None) -> int:
        keys = [self._key(model, name) for name in ("slow", "pause", "burst")]
        args = [rpm or 0, _ms(cooldown_s), _ms(retry_after_s) if retry_after_s else 0, _ms(BURST_S)]
        return int(self._throttle(keys=keys, args=args))
