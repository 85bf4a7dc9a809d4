"""Shapes of what a client reads about its own use: its task list, a deletion, the models it may use
and its usage. Query models validate request.args and become the parameters in /openapi.json."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from imagegate.app.schemas import RequestModel, TaskView
from imagegate.app.state.tasks import TaskStatus

LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX = 20, 100  # OpenAI's list endpoints: 20 by default, at most 100


def _aware(value: datetime | None) -> datetime | None:
    """A time without a zone is UTC."""
    if value is None:
        return None
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:  # e.g. 9999-12-31T23:00-05:00 has no UTC time
        raise ValueError("out of range") from None


class QueryModel(RequestModel):
    """Query parameters: an unknown one is refused (a misspelt filter would otherwise list everything)."""

    model_config = ConfigDict(extra="forbid")


class TaskListQuery(QueryModel):
    """GET /v1/images."""

    # A Literal, not TaskStatus: a query parameter's schema is inlined, it cannot $ref an enum.
    status: Literal["pending", "running", "succeed", "failed"] | None = Field(
        None, description="Only tasks with this status."
    )
    model: str | None = Field(None, min_length=1, max_length=200, description="Only tasks that asked for this model.")
    batch_id: str | None = Field(None, max_length=100, description="Only this batch's tasks.")
    created_after: datetime | None = Field(
        None, description="Only tasks created at or after this time: Unix seconds or ISO 8601 (UTC if no zone)."
    )
    limit: int = Field(LIST_LIMIT_DEFAULT, ge=1, le=LIST_LIMIT_MAX, description="Tasks per page.")
    after: str | None = Field(None, max_length=100, description="A task id: the page of tasks older than it.")

    @field_validator("created_after")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return _aware(value)


class TaskList(BaseModel):
    """OpenAI's list shape; each item is the task as GET /v1/images/{task_id} answers it, with its
    images as URLs (never base64: a page stays light)."""

    object: Literal["list"] = "list"
    data: list[TaskView]
    first_id: str | None
    last_id: str | None
    has_more: bool


class TaskDeleted(BaseModel):
    """OpenAI's deletion shape, plus the task's status (a running task ends `cancelled` shortly)."""

    id: str
    object: Literal["image.task"] = "image.task"
    deleted: Literal[True] = True
    task_status: TaskStatus


class ModelCapabilities(BaseModel):
    """What a request to this model may ask, as intake checks it (app/families.py)."""

    family: str | None = None
    sizes: list[str] | None = Field(None, description="Allowed `size` values; null: any WIDTHxHEIGHT; []: no size.")
    size_range: list[int] | None = Field(None, description="[min, max] of each side of a WIDTHxHEIGHT size.")
    min_pixels: int | None = None
    max_pixels: int | None = None
    aspect_ratios: list[str] | None = Field(None, description="Allowed `aspect_ratio` values; null: any.")
    max_prompt_chars: int
    max_n: int = Field(description="Most images (`n`) one request may ask for.")
    max_images_per_call: int | None = Field(
        None, description="Images one upstream call makes; more are made by concurrent calls."
    )
    async_upstream: bool | None = Field(
        None, description="The upstream is itself asynchronous (polled); null: unknown (a plugin adapter)."
    )
    fallbacks: list[str] = Field([], description="Models tried in order once this one's retries are spent.")
    max_retries: int = Field(description="Ceiling of a request's `retries`.")
    default: bool = Field(description="Used when a request names no model.")


class ModelView(BaseModel):
    """OpenAI's model object, with imagegate's capabilities under `imagegate`."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="When the providers file was last changed (Unix seconds).")
    owned_by: str = Field(description="The adapter serving it (the upstream's protocol).")
    imagegate: ModelCapabilities


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelView]


USAGE_GROUPS = ("model", "day", "api_key")


class UsageQuery(QueryModel):
    """GET /v1/usage."""

    start: datetime | None = Field(
        None, description="Tasks created at or after (Unix seconds or ISO 8601); default 30 days before `end`."
    )
    end: datetime | None = Field(None, description="Tasks created before this; default now.")
    group_by: str | None = Field(
        None,
        max_length=100,
        pattern=r"^(model|day|api_key)(,(model|day|api_key))*$",
        description="Comma-separated: model, day (UTC), api_key. None: one row for the whole window.",
    )
    api_key: str | None = Field(
        None, max_length=200, description="Admin token only: one key's usage, by the key's id or name."
    )

    @field_validator("start", "end")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return _aware(value)

    @property
    def groups(self) -> list[str]:
        return list(dict.fromkeys(self.group_by.split(","))) if self.group_by else []


class UpstreamUsage(BaseModel):
    """The upstreams' own usage numbers, summed over the tasks (each task's `usage`)."""

    model_config = ConfigDict(extra="allow")

    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    generated_images: int = 0


class UsageRow(BaseModel):
    object: Literal["usage.result"] = "usage.result"
    model: str | None = Field(None, description="With group_by=model.")
    day: str | None = Field(None, description="YYYY-MM-DD (UTC), with group_by=day.")
    api_key_id: str | None = Field(None, description="With group_by=api_key.")
    api_key_name: str | None = None
    tasks: int = Field(description="Tasks accepted.")
    succeeded: int
    failed: int
    unfinished: int = Field(description="Pending or running.")
    images: int = Field(description="Images of the tasks that succeeded.")
    usage: UpstreamUsage


class UsageReport(BaseModel):
    object: Literal["list"] = "list"
    start: int
    end: int
    group_by: list[str]
    data: list[UsageRow]


def jsonable(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json", exclude_none=True)
