"""GET /openapi.json, generated from the pydantic models that validate and answer requests."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from flask import Blueprint
from pydantic.json_schema import models_json_schema

from app.schemas import ErrorResponse, GenerationRequest, ImagesResponse, TaskAccepted, TaskView

bp = Blueprint("openapi", __name__)

REF = "#/components/schemas/{model}"


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": REF.format(model=name)}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(status): {"description": "Error", "content": _json("ErrorResponse")} for status in statuses}


@lru_cache(maxsize=1)
def openapi_document() -> dict[str, Any]:
    _, schemas = models_json_schema(
        [(GenerationRequest, "validation"), (ImagesResponse, "serialization"), (TaskAccepted, "serialization"),
         (TaskView, "serialization"), (ErrorResponse, "serialization")],
        ref_template=REF,
    )
    generate = {
        "operationId": "createImage",
        "summary": "Generate images (synchronously, or as a task with `async: true`)",
        "requestBody": {"required": True, "content": _json("GenerationRequest")},
        "responses": {
            "200": {"description": "The images (OpenAI's shape, plus task_id and task_status)",
                    "content": _json("ImagesResponse")},
            "202": {"description": "Accepted: the task id (async, or the wait ran out)", "content": _json("TaskAccepted")},
            **_errors(400, 401, 404, 409, 413, 500, 502, 503, 504),
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "imagegate", "version": "1", "description": "OpenAI-compatible image generation as durable jobs."},
        "components": {
            "schemas": schemas["$defs"],
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearerAuth": []}],
        "paths": {
            "/v1/images/generations": {"post": generate},
            "/v1/images/{task_id}": {"get": {
                "operationId": "getImageTask",
                "summary": "A task's status, and its images once it succeeded",
                "parameters": [{"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "The task", "content": _json("TaskView")},
                              **_errors(401, 404, 503)},
            }},
            "/v1/images/{task_id}/cancel": {"post": {
                "operationId": "cancelImageTask",
                "summary": "Cancel a task: a pending one ends at once, a running one before its next upstream call",
                "parameters": [{"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "Cancelled (failed with error code cancelled)",
                                      "content": _json("TaskView")},
                              "202": {"description": "Running: it stops before its next upstream call or store",
                                      "content": _json("TaskView")},
                              **_errors(401, 404, 409, 503)},
            }},
        },
    }


@bp.get("/openapi.json")
def openapi_json():
    return openapi_document()
