"""A worker process often gets its stop signal twice at once: systemd signals every process of the
unit and Ctrl-C the terminal's whole process group, while a group's parent (`imagegate worker`
with several processes) forwards the stop to its children too. Celery's shutdown handler takes a
lock (its signal dispatch's); a second signal handled inside the first, while that lock is held,
blocks in the event loop under gevent, and the worker died of BlockingSwitchOutError instead of
its warm shutdown. A stop signal arriving while one is being handled is dropped here: the first
is already stopping the worker. Signals that follow one another are handled as Celery handles
them (a second Ctrl-C, after the first was handled, still means a cold shutdown)."""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def handle_one_stop_signal_at_a_time() -> None:
    """Wrap the stop signals' handlers installed now (Celery's, once the worker has started)."""
    handling = False

    def one_at_a_time(handler):
        def handle(signum, frame):
            nonlocal handling
            if handling:
                return
            handling = True
            try:
                handler(signum, frame)
            finally:
                handling = False

        return handle

    for signum in STOP_SIGNALS:
        handler = signal.getsignal(signum)
        if callable(handler):
            try:
                signal.signal(signum, one_at_a_time(handler))
            except ValueError:  # not the main thread (a worker started inside a test): Celery's stay
                return
