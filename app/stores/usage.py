"""Usage of one key or of all (GET /v1/usage): tasks by outcome, images, and the upstreams' own usage
numbers, aggregated in one SQL statement over a window of created_at (Postgres and SQLite)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Engine, case, func, literal, select

from imagegate.app.models import ApiKey, Task
from imagegate.app.state.tasks import UNFINISHED, TaskStatus

# The numbers summed from each task's `usage` (what the upstream reported, added up over its calls).
# Any other key, or a value that is not a number, is not counted.
USAGE_NUMBERS = ("input_tokens", "output_tokens", "total_tokens", "generated_images")
GROUPS = ("model", "day", "api_key")


@dataclass(frozen=True)
class UsageFilter:
    start: datetime
    end: datetime
    api_key_ids: list[uuid.UUID] | None = None  # None: every key's (the admin)
    groups: list[str] = field(default_factory=list)  # of GROUPS


@dataclass(frozen=True)
class UsageTotals:
    group: dict[str, Any]  # model / day / api_key_id and api_key_name, as grouped
    tasks: int
    succeeded: int
    failed: int
    unfinished: int
    images: int
    usage: dict[str, int]


def _number(dialect: str, key: str) -> ColumnElement:
    """usage[key] when it is a JSON number, else 0: an upstream's odd value must not fail the sum."""
    if dialect == "postgresql":
        is_number = func.jsonb_typeof(Task.usage[key]) == "number"
    else:
        is_number = func.json_type(Task.usage, f'$."{key}"').in_(("integer", "real"))
    return case((is_number, Task.usage[key].as_float()), else_=literal(0.0))


def _day(dialect: str) -> ColumnElement:
    if dialect == "postgresql":
        return func.to_char(func.timezone("UTC", Task.created_at), "YYYY-MM-DD")
    return func.substr(Task.created_at, 1, 10)  # SQLite keeps times as UTC text, date first


def _count(condition: ColumnElement[bool], value: Any = 1) -> ColumnElement:
    return func.coalesce(func.sum(case((condition, value), else_=0)), 0)


def usage_totals(engine: Engine, filters: UsageFilter) -> list[UsageTotals]:
    """One row per group (ordered by the groups), or a single row for the whole window."""
    dialect = engine.dialect.name
    grouped: dict[str, ColumnElement] = {}
    for name in filters.groups:
        if name == "model":
            grouped["model"] = Task.model
        elif name == "day":
            grouped["day"] = _day(dialect)
        elif name == "api_key":
            grouped["api_key_id"] = Task.api_key_id
            grouped["api_key_name"] = ApiKey.name
    # A succeeded task made its request's n images (1 when n was not sent); n outlives a deletion.
    images = func.coalesce(Task.request["n"].as_integer(), 1)
    query = select(
        *(column.label(name) for name, column in grouped.items()),
        func.count().label("tasks"),
        _count(Task.status == TaskStatus.SUCCEED).label("succeeded"),
        _count(Task.status == TaskStatus.FAILED).label("failed"),
        _count(Task.status.in_(UNFINISHED)).label("unfinished"),
        _count(Task.status == TaskStatus.SUCCEED, images).label("images"),
        *(func.coalesce(func.sum(_number(dialect, key)), 0).label(key) for key in USAGE_NUMBERS),
    ).where(Task.created_at >= filters.start, Task.created_at < filters.end)
    if "api_key_name" in grouped:
        query = query.join(ApiKey, ApiKey.id == Task.api_key_id)
    if filters.api_key_ids is not None:
        query = query.where(Task.api_key_id.in_(filters.api_key_ids))
    if grouped:
        query = query.group_by(*grouped.values()).order_by(*grouped.values())
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    return [
        UsageTotals(
            group={name: getattr(row, name) for name in grouped},
            tasks=row.tasks,
            succeeded=int(row.succeeded),
            failed=int(row.failed),
            unfinished=int(row.unfinished),
            images=int(row.images),
            usage={key: round(getattr(row, key)) for key in USAGE_NUMBERS},
        )
        for row in rows
    ]


def key_ids_named(engine: Engine, name: str) -> list[uuid.UUID]:
    """The keys (live or revoked) called `name`."""
    with engine.connect() as connection:
        return list(connection.scalars(select(ApiKey.id).where(ApiKey.name == name)))
