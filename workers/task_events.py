"""Celery's task events (received, started, succeeded, failed: for Flower and `celery events`) sent
in groups. Celery groups them only under its own event loop (prefork, threads), not under gevent
(its own comment: "which should actually buffer"), where three Redis publishes per task were ~8% of
the worker's CPU. Here they go in one message per `buffer_limit` events (24) or every FLUSH_S,
whichever comes first; Celery's event receivers (Flower's too) read such grouped messages as they
are. Worker heartbeats are not grouped."""

from __future__ import annotations

import logging
import threading
import time

from celery import Celery, bootsteps

log = logging.getLogger(__name__)

FLUSH_S = 1.0


class GroupedTaskEvents(bootsteps.StartStopStep):
    """A consumer step after Celery's Events step: it makes the dispatcher just built buffer the
    task events, and one thread flushes whatever dispatcher the consumer has (it is rebuilt when
    the consumer reconnects). Celery's Events step flushes the buffer when it closes."""

    requires = ("celery.worker.consumer.events:Events",)

    def __init__(self, parent, **kwargs):
        self._flusher: threading.Thread | None = None
        super().__init__(parent, **kwargs)

    def start(self, c) -> None:
        dispatcher = c.event_dispatcher
        if dispatcher is None or not dispatcher.enabled or c.hub is not None:  # Celery groups them itself
            return
        dispatcher.buffer_group = frozenset({"task"})
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_forever, args=(c,), name="task-events", daemon=True)
            self._flusher.start()

    @staticmethod
    def _flush_forever(c) -> None:
        while True:
            time.sleep(FLUSH_S)
            dispatcher = c.event_dispatcher
            if dispatcher is None:
                continue
            try:
                dispatcher.flush()
            except Exception as exc:  # the broker is away: the consumer reconnects and we flush again
                log.debug("could not send task events: %s", exc)


def group_task_events(celery: Celery) -> None:
    celery.steps["consumer"].add(GroupedTaskEvents)
