"""A worker whose broker consumer died must not stay alive doing nothing.

After Redis restarts, a worker has been seen alive with no BRPOP connection, never consuming again
(celery/celery#9191, #8091, #7276: a gevent worker's consumer loop can end up with nothing to poll).
Its supervisor cannot tell, so the process checks itself: if messages wait in its queues while it
has free slots and it has received nothing for IMAGEGATE_CONSUMER_STALL_S, it exits with status 3
for its supervisor to restart it. The sweeper takes back the leases of whatever it was running.

On RabbitMQ it counts the queues' ready messages: RabbitMQ pushes a message to any consumer with room
in its prefetch window, and a window frees as each task starts, so messages that stay ready while
this worker has free slots and receives nothing mean its consumer is gone there too. Delayed
messages (countdowns) wait in other queues and are not counted.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

EXIT_CONSUMER_STALLED = 3


def spawn(function: Callable[[], None], delay_s: float = 0.0) -> None:
    """Run function in the background after delay_s, from anywhere: under the gevent pool this may be
    a signal handler running in the event loop, where starting a thread (it waits for the thread
    to start) raises BlockingSwitchOutError; a greenlet is only scheduled."""
    from gevent import monkey

    if monkey.is_module_patched("threading"):
        import gevent

        gevent.spawn_later(delay_s, function)
        return
    timer = threading.Timer(delay_s, function)
    timer.daemon = True
    timer.start()


class ConsumerWatchdog:
    def __init__(
        self, broker, queues: list[str], concurrency: int, stall_s: float, busy: Callable[[], int], check_s: float = 1.0
    ):
        self.broker, self.queues, self.concurrency, self.stall_s = broker, queues, concurrency, stall_s
        self.busy, self.check_s = busy, check_s
        self.last_received = time.monotonic()
        self.stopping = False

    def received(self, **_) -> None:  # the task_received signal
        self.last_received = time.monotonic()

    def stalled(self, waiting: int, busy: int, now: float) -> bool:
        return waiting > 0 and busy < self.concurrency and now - self.last_received >= self.stall_s

    def run(self) -> None:
        from imagegate.app.queue import messages_queued

        waiting_since: float | None = None
        while not self.stopping:
            time.sleep(self.check_s)
            try:
                waiting = sum(messages_queued(self.broker, self.queues).values())
            except Exception:  # the broker is away: Celery's own reconnecting is at work
                waiting_since = None
                continue
            now = time.monotonic()
            if not waiting or self.busy() >= self.concurrency:
                waiting_since = None
                continue
            waiting_since = waiting_since or now
            # Messages must have waited the whole period, not only since the last one was received.
            if now - waiting_since >= self.stall_s and self.stalled(waiting, self.busy(), now) and not self.stopping:
                log.critical(
                    "the broker consumer is dead: %d messages wait, %d of %d slots busy, nothing "
                    "received for %.0f s; exiting for the supervisor to restart this worker",
                    waiting,
                    self.busy(),
                    self.concurrency,
                    now - self.last_received,
                )
                logging.shutdown()
                os._exit(EXIT_CONSUMER_STALLED)
