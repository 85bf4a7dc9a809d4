"""Query parameters read the same way on every route: into a pydantic model, with a bad one
answered 400 in OpenAI's shape naming it."""

from __future__ import annotations

import uuid
from typing import TypeVar

from flask import request
from pydantic import BaseModel, ValidationError

from imagegate.app.ids import parse_id
from imagegate.app.web.errors import ApiError, from_validation_error

Query = TypeVar("Query", bound=BaseModel)


def query_params(model: type[Query]) -> Query:
    try:
        return model.model_validate(request.args.to_dict())
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def id_param(name: str, value: str | None) -> uuid.UUID | None:
    """An optional id parameter: None when absent, 400 when not an id."""
    if value is None:
        return None
    parsed = parse_id(value)
    if parsed is None:
        raise ApiError(400, f"Invalid value for '{name}': '{value}' is not an id.", param=name, code="invalid_value")
    return parsed
