"""Asynchronous submits in groups: the rows of concurrent requests in one multi-row INSERT, then
their messages in one broker round trip (app/grouping.py: the first request alone goes at once;
those arriving meanwhile form the next group).

Each request is answered only after its row is committed and its message published: a 202 means
the task is stored and queued. When publishing fails after the commit, the request is still
answered 202 with its task id (the task is stored, pending) and the sweeper publishes it once it is
older than IMAGEGATE_REPUBLISH_AFTER_S, as for a single submit. When the INSERT fails, each of the
group's requests gets that error (a 503 when the database is unreachable) and none of their rows
is stored; a row Postgres refuses for itself fails its own request alone.

Only submits with nothing else in their transaction come here: an Idempotency-Key, a key with
limits (its admission locks and counts in the transaction) or an edit's input files take the
single-row path of TaskStore.create.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from imagegate.app.grouping import Grouped
from imagegate.app.models import utcnow
from imagegate.app.queue import RunPublisher
from imagegate.app.state import tasks as transitions
from imagegate.app.stores.tasks import NewTask, TaskStore

log = logging.getLogger(__name__)

MAX_GROUP = 64


class AsyncSubmits:
    def __init__(self, tasks: TaskStore, runs: RunPublisher) -> None:
        self._tasks, self._runs = tasks, runs
        self._grouped: Grouped[dict[str, Any], None] = Grouped(self._store_and_publish, max_group=MAX_GROUP)

    @property
    def waiting(self) -> int:
        """Submits waiting for the group in progress to end."""
        return self._grouped.waiting

    def submit(
        self,
        *,
        api_key_id: uuid.UUID,
        model: str,
        request: dict[str, Any],
        response_format: str,
        callback_url: str | None,
    ) -> NewTask:
        """The new task, once stored and published (or, the broker failing, left to the sweeper)."""
        row = transitions.new_task(
            task_id=uuid.uuid4(),
            api_key_id=api_key_id,
            model=model,
            request=request,
            response_format=response_format,
            callback_url=callback_url,
            now=utcnow(),
        )
        self._grouped(row)
        return NewTask(row["id"], row["created_at"])

    def _store_and_publish(self, rows: list[dict[str, Any]]) -> list[Exception | None]:
        stored = self._tasks.accept_many(rows)
        accepted = [row["id"] for row, outcome in zip(rows, stored, strict=True) if outcome is None]
        for task_id, published in zip(accepted, self._runs.publish_many(accepted), strict=True):
            if published is not None:  # committed pending: a broker outage must not lose the reply
                log.error("could not publish task %s; it stays pending", task_id, exc_info=published)
        return stored
