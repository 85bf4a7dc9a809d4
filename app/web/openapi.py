"""GET /openapi.json, assembled from the app's routes and the @operation each declares, with the
schemas of the pydantic models that validate and answer them; GET /docs shows it (Swagger UI)."""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, Flask, current_app
from flask_swagger_ui import get_swaggerui_blueprint
from pydantic.json_schema import models_json_schema
from werkzeug.routing import Rule

from imagegate.app.schemas import ErrorResponse
from imagegate.app.web.operations import Operation, operation_of

bp = Blueprint("openapi", __name__)
# Swagger UI's files come with the package and are served from here: the page works offline.
bp.register_blueprint(get_swaggerui_blueprint("/docs", "/openapi.json", config={"app_name": "imagegate"}))

REF = "#/components/schemas/{model}"
IGNORED_METHODS = {"HEAD", "OPTIONS"}  # answered by Flask for every route


def _documented_routes(app: Flask) -> list[tuple[Rule, Operation]]:
    """One rule per view that declares an operation, in the order they were added: the shortest,
    when a view also answers with a trailing slash."""
    chosen: dict[str, tuple[Rule, Operation]] = {}
    for rule in app.url_map.iter_rules():
        described = operation_of(app.view_functions[rule.endpoint])
        if described and (rule.endpoint not in chosen or len(rule.rule) < len(chosen[rule.endpoint][0].rule)):
            chosen[rule.endpoint] = (rule, described)
    return list(chosen.values())


def _openapi_path(rule: Rule) -> str:
    return re.sub(r"<(?:[^<>:]+:)?([^<>]+)>", r"{\1}", rule.rule)


def _parameters(rule: Rule, described: Operation) -> list[dict[str, Any]]:
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in sorted(rule.arguments)
    ]
    if described.query:
        schema = described.query.model_json_schema()
        parameters += [
            {"name": name, "in": "query", "required": name in schema.get("required", ()), "schema": field_schema}
            for name, field_schema in schema["properties"].items()
        ]
    parameters += [
        {"name": name, "in": "header", "required": False, "schema": dict(header_schema)}
        for name, header_schema in described.headers.items()
    ]
    return parameters


def _operation_object(rule: Rule, described: Operation, refs: dict[tuple[type, str], Any]) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, reply in described.replies.items():
        schema = refs[reply.model, "serialization"] if reply.model else dict(reply.schema or {"type": "string"})
        responses[str(status)] = {"description": reply.description, "content": {reply.media_type: {"schema": schema}}}
    error = {"application/json": {"schema": refs[ErrorResponse, "serialization"]}}
    for status in described.errors:
        responses[str(status)] = {"description": "Error", "content": error}
    found: dict[str, Any] = {"operationId": described.operation_id, "summary": described.summary}
    parameters = _parameters(rule, described)
    if parameters:
        found["parameters"] = parameters
    if described.body or described.other_bodies:
        content = {"application/json": {"schema": refs[described.body, "validation"]}} if described.body else {}
        content |= {media_type: {"schema": dict(schema)} for media_type, schema in described.other_bodies.items()}
        found["requestBody"] = {"required": True, "content": content}
    found["responses"] = responses
    if described.public:
        found["security"] = []
    return found


def openapi_document(app: Flask) -> dict[str, Any]:
    routes = _documented_routes(app)
    models = {(ErrorResponse, "serialization")}
    for _, described in routes:
        models.update(described.models())
    refs, schemas = models_json_schema(
        sorted(models, key=lambda found: (found[0].__name__, found[1])), ref_template=REF
    )
    paths: dict[str, dict[str, Any]] = {}
    for rule, described in routes:
        for method in sorted((rule.methods or set()) - IGNORED_METHODS):
            paths.setdefault(_openapi_path(rule), {})[method.lower()] = _operation_object(rule, described, refs)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "imagegate",
            "version": "1",
            "description": "OpenAI-compatible image generation as durable jobs.",
        },
        "components": {
            "schemas": schemas["$defs"],
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearerAuth": []}],
        "paths": paths,
    }


@bp.get("/openapi.json")
def openapi_json():
    # Built once per app, on first use: the routes do not change after the app is made.
    document = current_app.extensions.get("imagegate.openapi")
    if document is None:
        document = current_app.extensions["imagegate.openapi"] = openapi_document(current_app)
    return document
