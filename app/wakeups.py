"""Wake-ups: workers announce a task's end; the synchronous requests waiting for it wake.

With Redis, one listener per web process holds one pub/sub connection and wakes the requests
waiting on the ended task, so hundreds of waiting requests cost one connection and no polling.
Under gevent (the API server) the listener and the waits are greenlets.

An end may come with its synchronous reply, handed over: the worker that has the images in hand
puts the reply's body in Redis beside the announcement, and the woken request takes it instead of
reading the images back from Postgres (after they were stored there). A hand-over that is missing
(expired, Redis restarted, never made) costs only that read.

Without Redis (the embedded mode's filesystem broker) there is nothing to subscribe to, so a
waiter is woken on a growing interval instead and re-reads the task.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

from imagegate.app.settings import is_redis_url

log = logging.getLogger(__name__)

# A handed-over reply is taken at once by the request waiting for it; one left behind (its request
# gave up at IMAGEGATE_SYNC_TIMEOUT_S, its API process died) is dropped after this long.
REPLY_TTL_MS = 30_000


class Wakeup(Protocol):
    def wait(self, timeout: float) -> bool: ...


class Wakeups(Protocol):
    def announce(self, task_id: str, reply: bytes | None = None) -> None: ...
    def announce_many(self, task_ids: list[str], replies: Mapping[str, bytes] | None = None) -> None: ...
    def take_reply(self, task_id: str) -> bytes | None: ...
    def subscription(self, task_id: str) -> AbstractContextManager[Wakeup]: ...
    def close(self) -> None: ...


class RedisWakeups:
    def __init__(self, redis_url: str):
        import redis  # imported here so the embedded mode never needs a Redis client

        # health_check_interval makes the listener notice a connection that died silently.
        self._redis = redis.Redis.from_url(redis_url, socket_keepalive=True, health_check_interval=30)
        # Pub/sub channels ignore Redis db indexes, so the index is part of the name.
        self.channel = f"imagegate:{self._redis.connection_pool.connection_kwargs.get('db', 0)}:task-ended"
        self._waiters: dict[str, set[threading.Event]] = defaultdict(set)
        self._lock = threading.Lock()
        self._listener: threading.Thread | None = None
        self._closed = False

    def announce(self, task_id: str, reply: bytes | None = None) -> None:
        self.announce_many([task_id], {task_id: reply} if reply is not None else None)

    def announce_many(self, task_ids: list[str], replies: Mapping[str, bytes] | None = None) -> None:
        """Several ends in one round trip (a worker's ends arrive in groups), each reply put before
        its end is announced, so a woken request finds it."""
        replies = replies or {}
        with self._redis.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                if (reply := replies.get(task_id)) is not None:
                    pipe.set(_reply_key(task_id), reply, px=REPLY_TTL_MS)
                pipe.publish(self.channel, task_id)
            pipe.execute()

    def take_reply(self, task_id: str) -> bytes | None:
        """The reply handed over for `task_id`, once (None: none is there, or Redis failed)."""
        import redis

        try:
            return self._redis.getdel(_reply_key(task_id))
        except redis.RedisError as exc:
            log.warning("could not take the handed-over reply of task %s: %s", task_id, exc)
            return None

    @contextmanager
    def subscription(self, task_id: str) -> Iterator[threading.Event]:
        """Register before publishing the task, then wait; re-read the task after every wake-up."""
        self._ensure_listening()
        event = threading.Event()
        with self._lock:
            self._waiters[task_id].add(event)
        try:
            yield _ClearingEvent(event)
        finally:
            with self._lock:
                self._waiters[task_id].discard(event)
                if not self._waiters[task_id]:
                    del self._waiters[task_id]

    def close(self) -> None:
        self._closed = True
        self._redis.close()

    def _ensure_listening(self) -> None:
        with self._lock:
            if self._listener is None or not self._listener.is_alive():
                self._listener = threading.Thread(target=self._listen, name="task-events", daemon=True)
                self._listener.start()

    def _listen(self) -> None:
        import redis

        while not self._closed:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.channel)
                # Events published while we were not subscribed are lost: wake every waiter so
                # each re-reads its task from the database.
                self._wake(None)
                for message in pubsub.listen():
                    if message["type"] == "message":
                        self._wake(message["data"].decode())
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                log.warning("task-events listener lost Redis (%s); reconnecting", exc)
                time.sleep(1)
            finally:
                pubsub.close()

    def _wake(self, task_id: str | None) -> None:
        with self._lock:
            if task_id is None:
                events = [event for group in self._waiters.values() for event in group]
            else:
                events = list(self._waiters.get(task_id, ()))
        for event in events:
            event.set()


def _reply_key(task_id: str) -> str:
    return f"imagegate:reply:{task_id}"


class _ClearingEvent:
    """An event that re-arms after each wake-up, so one waiter can wait several times."""

    def __init__(self, event: threading.Event):
        self._event = event

    def wait(self, timeout: float) -> bool:
        woken = self._event.wait(timeout)
        self._event.clear()
        return woken


class PollingWakeups:
    """For brokers without pub/sub: wake waiters on a growing interval (0.1 s up to 1 s)."""

    def announce(self, task_id: str, reply: bytes | None = None) -> None:
        pass

    def announce_many(self, task_ids: list[str], replies: Mapping[str, bytes] | None = None) -> None:
        pass

    def take_reply(self, task_id: str) -> bytes | None:
        return None

    @contextmanager
    def subscription(self, task_id: str) -> Iterator[_Interval]:
        yield _Interval()

    def close(self) -> None:
        pass


class _Interval:
    def __init__(self) -> None:
        self._next = 0.1

    def wait(self, timeout: float) -> bool:
        time.sleep(min(timeout, self._next))
        self._next = min(self._next * 1.5, 1.0)
        return True


def announce_quietly(events: Wakeups, task_id: object, reply: bytes | None = None) -> None:
    """Announce a task's end; a broker outage only delays waiters, who re-read the task on reconnect."""
    try:
        events.announce(str(task_id), reply)
    except Exception as exc:
        log.warning("could not announce the end of task %s: %s", task_id, exc)


def make_wakeups(broker_url: str) -> RedisWakeups | PollingWakeups:
    if is_redis_url(broker_url):
        return RedisWakeups(broker_url)
    return PollingWakeups()
