"""GET /openapi.json, generated from the pydantic models that validate and answer requests."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from flask import Blueprint
from pydantic.json_schema import models_json_schema

from app.schemas import (BatchCreate, BatchView, DeliveryList, ErrorResponse, GenerationRequest, ImagesResponse,
                         TaskAccepted, TaskView)

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
         (TaskView, "serialization"), (ErrorResponse, "serialization"), (BatchCreate, "validation"),
         (BatchView, "serialization"), (DeliveryList, "serialization")],
        ref_template=REF,
    )
    def path_id(name: str) -> dict[str, Any]:
        return {"name": name, "in": "path", "required": True, "schema": {"type": "string", "maxLength": 100}}

    generate = {
        "operationId": "createImage",
        "summary": "Generate images (synchronously, or as a task with `async: true`)",
        "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                        "schema": {"type": "string", "maxLength": 255}}],
        "requestBody": {"required": True, "content": _json("GenerationRequest")},
        "responses": {
            "200": {"description": "The images (OpenAI's shape, plus task_id and task_status)",
                    "content": _json("ImagesResponse")},
            "202": {"description": "Accepted: the task id (async, or the wait ran out)", "content": _json("TaskAccepted")},
            **_errors(400, 401, 404, 409, 413, 422, 500, 502, 503, 504),
        },
    }
    batch = {"200": {"description": "The batch", "content": _json("BatchView")}, **_errors(401, 404, 503)}
    batches = {
        "/v1/images/batches": {"post": {
            "operationId": "createImageBatch",
            "summary": "Submit many generation requests (JSON, or JSONL lines of {custom_id, body})",
            "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                            "schema": {"type": "string", "maxLength": 255}}],
            "requestBody": {"required": True, "content": {
                **_json("BatchCreate"), "application/jsonl": {"schema": {"type": "string"}}}},
            "responses": {"202": {"description": "Accepted", "content": _json("BatchView")},
                          **_errors(400, 401, 404, 413, 422, 503)},
        }},
        "/v1/images/batches/{batch_id}": {"get": {"operationId": "getImageBatch", "summary": "A batch and its counts",
                                                  "parameters": [path_id("batch_id")], "responses": batch}},
        "/v1/images/batches/{batch_id}/results": {"get": {
            "operationId": "getImageBatchResults", "summary": "One JSONL line per request, in line order",
            "parameters": [path_id("batch_id")],
            "responses": {"200": {"description": "JSONL", "content": {"application/jsonl": {"schema": {"type": "string"}}}},
                          **_errors(401, 404, 503)}}},
        "/v1/images/batches/{batch_id}/cancel": {"post": {
            "operationId": "cancelImageBatch", "summary": "Cancel every task of the batch not yet ended",
            "parameters": [path_id("batch_id")], "responses": batch}},
        "/v1/webhooks/deliveries": {"get": {
            "operationId": "listWebhookDeliveries", "summary": "Delivery attempts of the key's webhook events",
            "parameters": [{"name": name, "in": "query", "required": False,
                            "schema": {"type": "string", "maxLength": 100}} for name in ("task_id", "batch_id")]
            + [{"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1,
                                                                              "maximum": 1000}}],
            "responses": {"200": {"description": "Newest first", "content": _json("DeliveryList")},
                          **_errors(400, 401, 503)}}},
        "/v1/webhooks/deliveries/{delivery_id}/redeliver": {"post": {
            "operationId": "redeliverWebhook", "summary": "Send a delivery's event again",
            "parameters": [path_id("delivery_id")],
            "responses": {"202": {"description": "Queued", "content": {"application/json": {"schema": {
                "type": "object", "properties": {"event_id": {"type": "string"}, "status": {"type": "string"}}}}}},
                **_errors(401, 404, 429, 503)}}},
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
                "parameters": [path_id("task_id")],
                "responses": {"200": {"description": "The task", "content": _json("TaskView")},
                              **_errors(401, 404, 503)},
            }},
            "/v1/images/{task_id}/cancel": {"post": {
                "operationId": "cancelImageTask",
                "summary": "Cancel a task: a pending one ends at once, a running one before its next upstream call",
                "parameters": [path_id("task_id")],
                "responses": {"200": {"description": "Cancelled (failed with error code cancelled)",
                                      "content": _json("TaskView")},
                              "202": {"description": "Running: it stops before its next upstream call or store",
                                      "content": _json("TaskView")},
                              **_errors(401, 404, 409, 503)},
            }},
            **batches,
        },
    }


@bp.get("/openapi.json")
def openapi_json():
    return openapi_document()
