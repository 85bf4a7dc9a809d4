"""GET /v1/images (the key's tasks, a page at a time) and DELETE /v1/images/{task_id}."""

from __future__ import annotations

import logging

from flask import Blueprint, g

from imagegate.app.ids import parse_id
from imagegate.app.logs import bind_contextvars
from imagegate.app.read_schemas import TaskDeleted, TaskList, TaskListQuery
from imagegate.app.state.refused import Refused
from imagegate.app.state.tasks import CancelOutcome
from imagegate.app.stores.listing import ListFilter, UnknownCursor, list_tasks
from imagegate.app.views import task_view
from imagegate.app.web.auth import require_api_key
from imagegate.app.web.errors import ApiError
from imagegate.app.web.images import TaskIdConverter
from imagegate.app.web.operations import Reply, operation
from imagegate.app.web.params import id_param, query_params
from imagegate.app.web.services import services

log = logging.getLogger(__name__)

bp = Blueprint("task_reads", __name__, url_prefix="/v1/images")
bp.before_request(require_api_key)
bp.record_once(lambda state: state.app.url_map.converters.setdefault("task_id", TaskIdConverter))


@bp.get("")
@bp.get("/")
@operation(
    operation_id="listImageTasks",
    summary="The key's tasks, newest first, a page at a time (images as URLs)",
    query=TaskListQuery,
    replies={200: Reply("OpenAI's list shape: data, first_id, last_id, has_more", TaskList)},
    errors=(400, 401, 503),
)
def list_image_tasks():
    query = query_params(TaskListQuery)
    svc = services()
    filters = ListFilter(
        api_key_id=g.api_key_id,
        status=query.status,
        model=query.model,
        batch_id=id_param("batch_id", query.batch_id),
        created_after=query.created_after,
    )
    try:
        page = list_tasks(svc.engine, filters, limit=query.limit, after=id_param("after", query.after))
    except UnknownCursor:
        raise ApiError(
            400,
            f"Invalid value for 'after': no task found with id '{query.after}'.",
            param="after",
            code="invalid_value",
        ) from None
    views = [task_view(record, svc.settings, as_urls=True) for record in page.records]
    listed = TaskList(
        data=views,
        first_id=views[0].task_id if views else None,
        last_id=views[-1].task_id if views else None,
        has_more=page.has_more,
    )
    return listed.model_dump(mode="json", exclude_none=True) | {"first_id": listed.first_id, "last_id": listed.last_id}


@bp.delete("/<task_id:task_id>")
@operation(
    operation_id="deleteImageTask",
    summary="Delete a task's images and request (cancelling it first if unfinished); its status stays",
    replies={200: Reply("Deleted (again, if it already was)", TaskDeleted)},
    errors=(401, 404, 503),
)
def delete_image_task(task_id: str):
    svc = services()
    parsed = parse_id(task_id)
    result = svc.tasks.delete(parsed, g.api_key_id) if parsed else Refused.NOT_FOUND
    if isinstance(result, Refused):  # missing, malformed and another key's: one answer, as GET
        raise ApiError(404, f"No task found with id '{task_id}'.", param="task_id", code="task_not_found")
    bind_contextvars(task_id=str(result.id))
    log.info("task deleted")
    if result.cancelled is CancelOutcome.ENDED:  # wake waiters, send its webhook, maybe close its batch
        svc.after_end.task_ended(result.id, result.batch_id, has_callback=result.has_callback)
    status = svc.tasks.status(result.id)
    return TaskDeleted(id=str(result.id), task_status=status).model_dump(mode="json")
