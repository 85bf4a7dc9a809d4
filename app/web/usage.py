"""GET /v1/usage: a key's tasks, images and upstream usage over a window; with the admin token
(IMAGEGATE_ADMIN_TOKEN, the dashboard's) every key's, or one key's with `api_key=`."""

from __future__ import annotations

import hashlib
import hmac
from datetime import timedelta

from flask import Blueprint, g, request

from imagegate.app.ids import parse_id
from imagegate.app.models import utcnow
from imagegate.app.read_schemas import UpstreamUsage, UsageQuery, UsageReport, UsageRow
from imagegate.app.stores.usage import UsageFilter, key_ids_named, usage_totals
from imagegate.app.web.auth import require_api_key
from imagegate.app.web.errors import ApiError
from imagegate.app.web.operations import Reply, operation
from imagegate.app.web.params import query_params
from imagegate.app.web.services import services

DEFAULT_WINDOW = timedelta(days=30)

bp = Blueprint("usage", __name__, url_prefix="/v1/usage")


def _is_admin_token(presented: str) -> bool:
    token = services().settings.admin_token
    secret = token.get_secret_value() if token else ""
    # Both sides hashed first: constant time whatever the lengths.
    return bool(secret) and hmac.compare_digest(
        hashlib.sha256(presented.encode()).digest(), hashlib.sha256(secret.encode()).digest()
    )


@bp.before_request
def _key_or_admin() -> None:
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    g.admin = scheme.lower() == "bearer" and _is_admin_token(presented.strip())
    if not g.admin:
        require_api_key()


def _key_ids(query: UsageQuery):
    """Whose usage: the caller's key; for the admin every key's, or the one `api_key` names."""
    if not g.admin:
        if query.api_key is not None:
            raise ApiError(
                403, "Only the admin token may ask for another key's usage.", param="api_key", code="admin_only"
            )
        return [g.api_key_id]
    if query.api_key is None:
        return None
    parsed = parse_id(query.api_key)
    found = [parsed] if parsed else key_ids_named(services().engine, query.api_key)
    if not found:
        raise ApiError(404, f"No API key named '{query.api_key}'.", param="api_key", code="api_key_not_found")
    return found


@bp.get("")
@bp.get("/")
@operation(
    operation_id="getUsage",
    summary="Tasks, images and upstream usage (tokens, generated_images) over a window, grouped",
    query=UsageQuery,
    replies={200: Reply("One row per group (one row without group_by)", UsageReport)},
    errors=(400, 401, 403, 404, 503),
)
def get_usage():
    query = query_params(UsageQuery)
    end = query.end or utcnow()
    try:
        start = query.start or end - DEFAULT_WINDOW
    except OverflowError:  # an `end` in year 1
        raise ApiError(400, "Invalid value for 'end': out of range.", param="end", code="invalid_value") from None
    if start >= end:
        raise ApiError(400, "Invalid value for 'start': it must be before 'end'.", param="start", code="invalid_value")
    filters = UsageFilter(start=start, end=end, api_key_ids=_key_ids(query), groups=query.groups)
    rows = [
        UsageRow(
            model=totals.group.get("model"),
            day=totals.group.get("day"),
            api_key_id=str(totals.group["api_key_id"]) if "api_key_id" in totals.group else None,
            api_key_name=totals.group.get("api_key_name"),
            tasks=totals.tasks,
            succeeded=totals.succeeded,
            failed=totals.failed,
            unfinished=totals.unfinished,
            images=totals.images,
            usage=UpstreamUsage(**totals.usage),
        )
        for totals in usage_totals(services().engine, filters)
    ]
    report = UsageReport(start=int(start.timestamp()), end=int(end.timestamp()), group_by=query.groups, data=rows)
    return report.model_dump(mode="json", exclude_none=True)
