"""Tasks for intake, cancel, the sweeper and the readers: each unit of work is one transaction around
one transition of app.state.tasks (and the records that go with it: the idempotency key, the webhook
events, the attempts an end closes). The worker's side is app.stores.attempts.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Connection, Engine, bindparam, delete, select, update
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from imagegate.app.edits import InputFile
from imagegate.app.failures import ErrorCode, Failure
from imagegate.app.grouping import Grouped
from imagegate.app.idempotency import reserve
from imagegate.app.image_store import DatabaseImages, ImageStore
from imagegate.app.key_limits import Admission, Admit
from imagegate.app.models import Attempt, IdempotencyKey, Image, Task, utcnow
from imagegate.app.state import tasks as transitions
from imagegate.app.state.refused import Refused
from imagegate.app.state.tasks import UNFINISHED, CancelOutcome, TaskStatus
from imagegate.app.stores.images import ImageRecords
from imagegate.app.stores.inputs import delete_inputs, save_inputs
from imagegate.app.stores.webhooks import enqueue_task_events

TASK_TABLE, ATTEMPT_TABLE = Task.__table__, Attempt.__table__
# Built once: a prepared Core statement skips the ORM and the per-call compile cache key.
_TASK = select(TASK_TABLE).where(TASK_TABLE.c.id == bindparam("id"))
_TASK_OF_KEY = _TASK.where(TASK_TABLE.c.api_key_id == bindparam("api_key_id"))
_TASK_STATUS = select(TASK_TABLE.c.status).where(TASK_TABLE.c.id == bindparam("id"))
_IMAGE = Image.__table__
_IMAGES = (
    select(_IMAGE.c.id, _IMAGE.c.index, _IMAGE.c.content_type, _IMAGE.c.revised_prompt, _IMAGE.c.store_key)
    .where(_IMAGE.c.task_id == bindparam("task_id"))
    .order_by(_IMAGE.c.slot, _IMAGE.c.index)
)
_IMAGES_WITH_BYTES = _IMAGES.add_columns(_IMAGE.c.data)
_DELETABLE = select(
    TASK_TABLE.c.api_key_id,
    TASK_TABLE.c.status,
    TASK_TABLE.c.deleted,
    TASK_TABLE.c.request,
    TASK_TABLE.c.batch_id,
    TASK_TABLE.c.callback_url,
).where(TASK_TABLE.c.id == bindparam("id"))
_TASK_CREATED = select(TASK_TABLE.c.id, TASK_TABLE.c.created_at).where(TASK_TABLE.c.id == bindparam("id"))
# Concurrent submits' rows, at most this many in one INSERT … VALUES (…), (…) (one statement, so in
# autocommit one transaction: all of a group's rows are stored or none).
MAX_ACCEPT_GROUP = 64


@dataclass(frozen=True)
class StoredImage:
    id: uuid.UUID
    index: int
    content_type: str
    revised_prompt: str | None
    data: bytes | None  # loaded only when the caller asked for bytes
    # The image store's own URL (IMAGEGATE_IMAGE_URLS=store), handed out instead of the gateway's.
    store_url: str | None = None


@dataclass(frozen=True)
class TaskRecord:
    task: Task
    images: list[StoredImage]
    attempts: list[Attempt] = field(default_factory=list)


class NewTask(NamedTuple):
    """What intake needs of a task it accepted (or replayed)."""

    id: uuid.UUID
    created_at: datetime


class Deleted(NamedTuple):
    """A task the client deleted; `cancelled` says whether deleting cancelled it (None: it had ended)."""

    id: uuid.UUID
    batch_id: uuid.UUID | None
    has_callback: bool
    cancelled: CancelOutcome | None


class Requeued(NamedTuple):
    """A task to publish again: attempt `attempt` of it, on its batch's queue if it has one."""

    task_id: uuid.UUID
    attempt: int
    batch_id: uuid.UUID | None


def _after(seconds: float) -> datetime:
    return utcnow() + timedelta(seconds=seconds)


class TaskStore:
    def __init__(
        self, sessions: sessionmaker[Session], images: ImageStore | None = None, *, presign_ttl_s: int | None = None
    ):
        self._sessions = sessions
        # Where rows with a store_key have their bytes; with presign_ttl_s, the store's URLs are given out.
        self._images = images or DatabaseImages()
        self._presign_ttl_s = presign_ttl_s
        self._engine: Engine = sessions.kw["bind"]  # intake and reads use Core connections, no Session
        self._image_records = ImageRecords(self._engine, self._images)
        # A lone statement is its own transaction: without BEGIN and COMMIT, one round trip, not three.
        self._autocommit = self._engine.execution_options(isolation_level="AUTOCOMMIT")
        # Submits with nothing else to do in their transaction are inserted in groups (app/grouping.py).
        self._accept_grouped: Grouped[dict[str, Any], None] = Grouped(self.accept_many, max_group=MAX_ACCEPT_GROUP)

    # -- intake and reading ------------------------------------------------------------------
    def create(
        self,
        *,
        api_key_id: uuid.UUID,
        model: str,
        request: dict[str, Any],
        response_format: str,
        callback_url: str | None = None,
        idempotency: tuple[str, str] | None = None,
        inputs: Sequence[InputFile] = (),
        admit: Admit | None = None,
    ) -> tuple[NewTask, bool]:
        """The new task, True; or, when the Idempotency-Key (key, fingerprint) was used before with
        the same request, that earlier task, False. One transaction, Core statements (no ORM unit of
        work): this is the hot path of every submit. An edit's input files are written in it too.
        `admit` (the key's limits) runs in it, only for a request that is not a replay, and may
        refuse it."""
        now, task_id = utcnow(), uuid.uuid4()
        row = transitions.new_task(
            task_id=task_id,
            api_key_id=api_key_id,
            model=model,
            request=request,
            response_format=response_format,
            callback_url=callback_url,
            now=now,
        )
        if idempotency is None and not inputs and admit is None:  # the INSERT alone, grouped
            self._accept_grouped(row)
            return NewTask(task_id, now), True
        with Admission(admit) as admission, self._engine.begin() as connection:
            earlier = reserve(connection, api_key_id, *idempotency, task_id=task_id) if idempotency else None
            if earlier is not None:
                found = connection.execute(_TASK_CREATED, {"id": earlier.task_id}).one()
                return NewTask(found.id, found.created_at), False
            admission.run(connection)
            transitions.accept(connection, row)
            save_inputs(connection, task_id, inputs)
        return NewTask(task_id, now), True

    def accept_many(self, rows: list[dict[str, Any]]) -> list[Exception | None]:
        """Concurrent submits' rows (transitions.new_task's) in one autocommitted multi-row INSERT;
        one outcome per row, None when stored. When it fails for something other than the connection
        (a row Postgres refuses), each row is tried alone, so only the request whose row is refused
        fails; a connection error fails the whole group (its requests answer 503, and none of its
        rows is stored: one statement is one transaction)."""
        try:
            with self._autocommit.connect() as connection:
                transitions.accept_many(connection, rows)
            return [None] * len(rows)
        except DBAPIError as exc:
            if len(rows) == 1 or isinstance(exc, (OperationalError, InterfaceError)) or exc.connection_invalidated:
                raise
        outcomes: list[Exception | None] = []
        for row in rows:
            try:
                with self._autocommit.connect() as connection:
                    transitions.accept(connection, row)
                outcomes.append(None)
            except DBAPIError as exc:
                outcomes.append(exc)
        return outcomes

    def get(
        self,
        task_id: uuid.UUID,
        *,
        api_key_id: uuid.UUID | None = None,
        with_bytes: bool = False,
        with_attempts: bool = True,
    ) -> TaskRecord | None:
        """The task (a Core row with the Task's attribute names: no ORM identity map on the read path),
        its images, and its attempt log unless with_attempts=False (a synchronous reply needs none).
        Autocommitted reads: under READ COMMITTED a transaction would give each SELECT its own
        snapshot anyway, and it cost a BEGIN and a ROLLBACK round trip around them."""
        with self._autocommit.connect() as session:
            query = _TASK if api_key_id is None else _TASK_OF_KEY
            task = session.execute(query, {"id": task_id, "api_key_id": api_key_id}).one_or_none()
            if task is None:
                return None
            rows = []
            # Bytes are only ever served inline for b64_json: a url task's are not read (from S3, say).
            with_bytes = with_bytes and task.response_format == "b64_json"
            if task.status == TaskStatus.SUCCEED:
                params = {"task_id": task_id}
                rows = (
                    _binary_rows(session, _IMAGES_WITH_BYTES, params)
                    if with_bytes
                    else list(session.execute(_IMAGES, params))
                )
            attempts = (
                list(
                    session.execute(
                        select(ATTEMPT_TABLE)
                        .where(ATTEMPT_TABLE.c.task_id == task_id)
                        .order_by(ATTEMPT_TABLE.c.number, ATTEMPT_TABLE.c.slot)
                    )
                )
                if with_attempts
                else []
            )
        # The store is read with the connection given back: its reads are files or HTTP.
        return TaskRecord(task, self._stored_images(rows, with_bytes), attempts)  # type: ignore[arg-type]

    def _stored_images(self, rows: list, with_bytes: bool) -> list[StoredImage]:
        found = []
        for row in rows:
            data = row.data if with_bytes else None
            if with_bytes and row.store_key is not None:
                data = self._images.get(row.store_key)
                if data is None:  # being deleted (retention, a delete) right now: as if already gone
                    continue
            url = (
                self._images.url(row.store_key, row.content_type, self._presign_ttl_s)
                if self._presign_ttl_s is not None and row.store_key is not None
                else None
            )
            found.append(StoredImage(row.id, row.index, row.content_type, row.revised_prompt, data, url))
        return found

    def status(self, task_id: uuid.UUID) -> str | None:
        """The task's status alone: the cheap re-read of a waiting synchronous request."""
        with self._autocommit.connect() as session:
            return session.execute(_TASK_STATUS, {"id": task_id}).scalar_one_or_none()

    def image(self, image_id: uuid.UUID) -> tuple[str, bytes] | None:
        """(content type, bytes) of one image, read through the image store when it is kept there."""
        with self._engine.connect() as connection:
            row = connection.execute(
                select(Image.content_type, Image.data, Image.store_key).where(Image.id == image_id)
            ).one_or_none()
        if row is None:
            return None
        data = row.data if row.store_key is None else self._images.get(row.store_key)
        return (row.content_type, data) if data is not None else None

    def cancel(self, task_id: uuid.UUID, api_key_id: uuid.UUID) -> CancelOutcome | Refused:
        """A pending task fails `cancelled` now, a running one stops before its next call; refused
        `not_found`, `not_owner` or `already_ended`."""
        with self._engine.begin() as connection:
            outcome = transitions.cancel(connection, task_id, api_key_id)
            if outcome is CancelOutcome.ENDED:
                enqueue_task_events(connection, [task_id])
        return outcome

    def delete(self, task_id: uuid.UUID, api_key_id: uuid.UUID) -> Deleted | Refused:
        """The client's DELETE, in one transaction: an unfinished task is cancelled first (the same
        transition as `cancel`), then its request is dropped (DELETED_REQUEST keeps what usage
        counts); then its images are deleted, bytes first (ImageRecords). The row stays, with its
        status, timestamps and usage. Deleting again deletes whatever images a failure left.
        Refused `not_found` or `not_owner`."""
        with self._engine.begin() as connection:
            row = connection.execute(_DELETABLE, {"id": task_id}).one_or_none()
            if row is None:
                return Refused.NOT_FOUND
            if row.api_key_id != api_key_id:
                return Refused.NOT_OWNER
            cancelled = None
            if not row.deleted and row.status in UNFINISHED:
                outcome = transitions.cancel(connection, task_id, api_key_id)
                cancelled = outcome if isinstance(outcome, CancelOutcome) else None
                if cancelled is CancelOutcome.ENDED:
                    enqueue_task_events(connection, [task_id])
            transitions.mark_deleted(connection, task_id, deleted_request(row.request))
            delete_inputs(connection, [task_id])  # an edit's input files go with its request
        self._image_records.delete_for_tasks([task_id])
        return Deleted(task_id, row.batch_id, row.callback_url is not None, cancelled)

    # -- the sweeper -------------------------------------------------------------------------
    def fail_overdue(self, deadline_s: float) -> list[uuid.UUID]:
        """Tasks not ended `deadline_s` after they were accepted fail `deadline_exceeded`."""
        failure = Failure(ErrorCode.DEADLINE_EXCEEDED, f"The task did not end within {deadline_s:g} s.")
        with self._engine.begin() as connection:
            ids = transitions.fail_overdue(connection, _after(-deadline_s), failure)
            _close_open_attempts(connection, ids, failure)
            enqueue_task_events(connection, ids)
        return ids

    def take_back_expired(self, max_attempts: int) -> tuple[list[Requeued], list[uuid.UUID]]:
        """Running attempts whose lease expired: their worker is dead, frozen or gone. Each goes back to
        pending (returned with its next attempt number), or fails when it was cancelled or has used
        its attempts. Returns (requeued, failed)."""
        lost = Failure(ErrorCode.WORKER_LOST, "The worker running this attempt stopped renewing its lease.")
        now = utcnow()
        with self._engine.begin() as connection:
            failed = transitions.fail_expired(connection, now, max_attempts)
            requeued = _requeued(transitions.requeue_expired(connection, now, lost))
            _close_open_attempts(connection, failed + [item.task_id for item in requeued], lost)
            enqueue_task_events(connection, failed)
        return requeued, failed

    def overdue_pending(self, republish_after_s: float) -> list[Requeued]:
        """Pending tasks due for `republish_after_s` with no worker taking them: their message was
        lost (never published, or a flushed broker). Bumps run_after so one sweeper republishes."""
        with self._engine.begin() as connection:
            return _requeued(transitions.republish_overdue(connection, _after(-republish_after_s)))

    def batch_of(self, task_ids: list[uuid.UUID]) -> dict[uuid.UUID, uuid.UUID | None]:
        with self._sessions() as session:
            return dict(session.execute(select(Task.id, Task.batch_id).where(Task.id.in_(task_ids))).all())

    def forget_idempotency_keys(self, ttl_s: float) -> int:
        with self._sessions.begin() as session:
            return session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < _after(-ttl_s))).rowcount


# A deleted task's request: the prompt and every other field go; `n` stays, as usage counts the
# images of succeeded tasks by it. It still validates as a GenerationRequest: a running attempt
# polling an asynchronous upstream reads it again, and must end `cancelled`, not fail to parse it.
DELETED_PROMPT = "(deleted)"


def deleted_request(request: dict[str, Any]) -> dict[str, Any]:
    kept = {"n": request["n"]} if isinstance(request.get("n"), int) else {}
    return {"prompt": DELETED_PROMPT} | kept


def _binary_rows(connection: Connection, query, params: dict) -> list:
    """The query's rows, image bytes included. On Postgres in binary format: in text format a bytea
    travels hex-encoded, twice its size, and decoding it costs the API ~0.5 ms of CPU and ~1 ms per
    150 KB image (a synchronous reply's re-read)."""
    if connection.dialect.name != "postgresql":
        return list(connection.execute(query, params))
    from psycopg.rows import namedtuple_row

    driver = connection.connection.driver_connection
    with driver.cursor(row_factory=namedtuple_row, binary=True) as cursor:
        return cursor.execute(_sql_of(query, connection.dialect), params).fetchall()


@functools.cache
def _sql_of(query, dialect) -> str:
    """The statement's SQL, compiled once (compiling it was 6% of a synchronous request's API CPU)."""
    return str(query.compile(dialect=dialect))


def _requeued(rows) -> list[Requeued]:
    return [Requeued(row.id, row.attempts + 1, row.batch_id) for row in rows]


def _close_open_attempts(connection: Connection, task_ids: list[uuid.UUID], failure: Failure) -> None:
    if task_ids:
        connection.execute(
            update(ATTEMPT_TABLE)
            .where(ATTEMPT_TABLE.c.task_id.in_(task_ids), ATTEMPT_TABLE.c.ended_at.is_(None))
            .values(ended_at=utcnow(), error_code=failure.code, error_message=failure.message)
        )
