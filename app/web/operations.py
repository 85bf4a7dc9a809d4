"""What each route does, declared as data beside it with @operation; /openapi.json is assembled
from these by walking the app's routes (app/web/openapi.py)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel

View = TypeVar("View", bound=Callable[..., Any])


@dataclass(frozen=True)
class Reply:
    """One documented answer: a pydantic model as JSON, or a raw media type (JSONL, image bytes)."""

    description: str
    model: type[BaseModel] | None = None
    media_type: str = "application/json"
    schema: Mapping[str, Any] | None = None  # for a raw media type, instead of a model


@dataclass(frozen=True)
class Operation:
    operation_id: str
    summary: str
    replies: Mapping[int, Reply]
    errors: tuple[int, ...] = ()  # statuses answered in OpenAI's error shape (ErrorResponse)
    body: type[BaseModel] | None = None  # validates the JSON body
    other_bodies: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # media type -> schema
    query: type[BaseModel] | None = None  # validates request.args: one parameter per field
    headers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # optional header -> schema
    public: bool = False  # needs no API key

    def models(self) -> list[tuple[type[BaseModel], str]]:
        """The models the document defines for this operation, each with its JSON-schema mode (the
        query model's fields become parameters instead)."""
        found = [(reply.model, "serialization") for reply in self.replies.values() if reply.model]
        return found + [(self.body, "validation")] if self.body else found


def operation(**fields: Any) -> Callable[[View], View]:
    """Records an Operation on the view function, for the OpenAPI document."""
    described = Operation(**fields)

    def record(view: View) -> View:
        view.openapi_operation = described  # type: ignore[attr-defined]
        return view

    return record


def operation_of(view: Callable[..., Any]) -> Operation | None:
    return getattr(view, "openapi_operation", None)
