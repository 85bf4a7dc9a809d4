"""The worker's Celery app: the shared configuration plus the task bodies."""

from __future__ import annotations

import logging
import os

from celery import Celery
from celery.signals import task_received, worker_ready, worker_shutting_down

from imagegate.app.after_end import AfterEnd
from imagegate.app.heartbeats import Heart
from imagegate.app.providers import load_models
from imagegate.app.queue import DELIVER_WEBHOOK, RUN_TASK, WEBHOOK_QUEUE, WORKER_QUEUES, broker_client
from imagegate.app.runtime import build_runtime
from imagegate.app.settings import Settings
from imagegate.app.stores.attempts import AttemptStore
from imagegate.workers.adapters import load_adapters
from imagegate.workers.announcements import GroupedAnnouncements
from imagegate.workers.consumer_watchdog import ConsumerWatchdog, spawn
from imagegate.workers.grouped import Grouped
from imagegate.workers.http import check_idle_connections_without_the_hub, make_client
from imagegate.workers.leases import LeaseKeeper
from imagegate.workers.model_limiter import make_limiter
from imagegate.workers.runner import TaskRunner
from imagegate.workers.stop_signals import handle_one_stop_signal_at_a_time
from imagegate.workers.task_events import group_task_events
from imagegate.workers.webhook_delivery import WebhookSender

log = logging.getLogger(__name__)


def make_worker_app(settings: Settings, *, concurrency: int = 1000) -> Celery:
    # A pool of 20 is enough: the hot writes are grouped (workers/grouped.py) and leases renewed in one.
    runtime = build_runtime(settings.check(), pool_size=min(20, concurrency), by_key_only=True)
    celery = runtime.celery
    # Celery's own "received" and "succeeded in" lines and httpx's "HTTP Request" line, three per
    # task, repeat what the runner logs once (an upstream's error status is in the task's end line).
    for name in ("celery.app.trace", "celery.worker.strategy", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    group_task_events(celery)
    if settings.uses_redis:  # messages taken several at a time, early acks that cost Redis nothing
        celery.conf.broker_transport = "imagegate.workers.redis_transport:WorkerRedisTransport"
    check_idle_connections_without_the_hub()  # the gevent pool patched select before this runs
    adapters = load_adapters()
    attempts = AttemptStore(runtime.engine)
    models = load_models(settings.providers_file, set(adapters))
    runner = TaskRunner(
        settings=settings,
        store=attempts,
        leases=LeaseKeeper(attempts, settings.lease_s),
        successes=Grouped(attempts.succeed_many, name="successes"),
        models=models,
        adapters=adapters,
        http=make_client(max_connections=max(20, concurrency * 2)),
        # Ends announced grouped (workers/announcements.py); webhooks and batches as everywhere.
        after_end=AfterEnd(GroupedAnnouncements(runtime.wakeups), runtime.webhooks, runtime.batches, celery),
        celery=celery,
        image_store=runtime.image_store,
        limiter=make_limiter(settings),
    )
    sender = WebhookSender(settings, runtime.webhooks, runtime.tasks, runtime.batches, celery)

    # Acknowledged when it starts, not when it ends: from its claim on, the attempt's lease in Postgres
    # is what recovers it if this process dies (the sweeper takes back an expired lease), and a
    # message that dies with the process before the claim leaves its task pending, which the sweeper
    # republishes. So the broker holds no message for the length of an upstream call, and a thousand
    # calls in flight are not a thousand unacknowledged messages for Redis to track and restore.
    @celery.task(name=RUN_TASK, bind=True, acks_late=False)
    def run_task(self, task_id: str, attempt: int, poll: int = 0, awaited: bool = False) -> None:
        runner.run(task_id, attempt, poll, worker=self.request.hostname or "worker", awaited=awaited)

    # Only a hand-over to the delivery lane: it returns at once (see workers/webhook_delivery.py).
    @celery.task(name=DELIVER_WEBHOOK, acks_late=True, reject_on_worker_lost=True, queue=WEBHOOK_QUEUE)
    def deliver_webhook(event_id: str) -> None:
        sender.run(event_id)

    # Celery keeps a non-thread-safe backend per thread, and under gevent each task's greenlet is a
    # thread: without a backend of their own the tasks built one per message (3% of a sync request's
    # worker CPU). Results live in the database, so the disabled backend is shared.
    for task in (run_task, deliver_webhook):
        task.backend = celery.backend

    heart = Heart(runtime.engine, "worker", {"concurrency": concurrency, "queues": list(WORKER_QUEUES)})

    @worker_ready.connect(weak=False)
    def _start_the_heartbeat(**_) -> None:
        heart.start()

    @worker_ready.connect(weak=False)
    def _stop_signals_one_at_a_time(**_) -> None:
        handle_one_stop_signal_at_a_time()  # Celery's stop handlers are installed by now

    watchdog: ConsumerWatchdog | None = None
    if settings.uses_redis or settings.uses_amqp:
        from celery.worker import state

        watchdog = ConsumerWatchdog(
            broker_client(settings, timeout_s=10),
            list(WORKER_QUEUES),
            concurrency,
            settings.consumer_stall_s,
            busy=lambda: len(state.active_requests),
        )
        task_received.connect(watchdog.received, weak=False)

        @worker_ready.connect(weak=False)
        def _watch_the_consumer(**_) -> None:
            watchdog.received()  # the consumer just started: count from now
            spawn(watchdog.run)

    @worker_shutting_down.connect(weak=False)
    def _bounded_warm_shutdown(**_) -> None:
        heart.stop()
        # Celery's warm shutdown waits for running tasks without limit; past the grace period the
        # process exits, and the sweeper takes back what it held once the leases expire. Under the
        # gevent pool this handler runs in the event loop, where nothing may block: spawn() only
        # schedules the deadline.
        if watchdog is not None:
            watchdog.stopping = True  # a stopping consumer takes nothing on purpose

        def give_up() -> None:
            log.warning("warm shutdown still busy after %.0f s; exiting", settings.shutdown_grace_s)
            os._exit(1)

        spawn(give_up, settings.shutdown_grace_s)

    return celery
