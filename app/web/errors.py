"""Every error the API answers is OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging

from flask import Flask, jsonify
from pydantic import ValidationError
from pydantic_core import ErrorDetails
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from werkzeug.exceptions import HTTPException

from imagegate.app.idempotency import IdempotencyMismatch
from imagegate.app.schemas import ErrorDetail, ErrorResponse

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        extra: dict | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.extra = extra or {}  # more fields inside "error", e.g. a batch's bad lines
        self.headers = headers or {}  # e.g. a 429's Retry-After


def error_response(
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    detail: dict | None = None,
    **extra,
):
    body = ErrorResponse(error=ErrorDetail(message=message, type=type, param=param, code=code)).model_dump()
    body["error"].update(detail or {})
    response = jsonify(body | extra)
    response.status_code = status
    return response


def from_validation_error(exc: ValidationError) -> ApiError:
    """The first problem pydantic found, with `param` naming the field."""
    return from_error_details(exc.errors(include_url=False)[0])


def from_error_details(error: ErrorDetails) -> ApiError:
    """One problem pydantic found, with `param` naming the field."""
    if error["type"] == "json_invalid":
        return ApiError(400, f"The request body is not valid JSON: {error['msg']}", code="invalid_json")
    if error["type"] == "model_type" or not error["loc"]:
        return ApiError(400, "The request body must be a JSON object.", code="invalid_request")
    param = ".".join(str(part) for part in error["loc"])
    message = error["msg"]
    if error["type"] == "missing":
        message = f"Missing required parameter: '{param}'."
        code = "missing_required_parameter"
    elif error["type"] == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
        code = "unknown_parameter"
    else:
        message = f"Invalid value for '{param}': {message}."
        code = "invalid_value"
    return ApiError(400, message, param=param, code=code)


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        response = error_response(
            exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code, detail=exc.extra
        )
        response.headers.update(exc.headers)
        return response

    @app.errorhandler(IdempotencyMismatch)  # a single submit's or a batch's: one answer
    def _idempotency_key_reused(_exc: IdempotencyMismatch):
        return error_response(
            422,
            "This Idempotency-Key was already used with a different request body.",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        response = _http_error_body(exc)
        for name, value in exc.get_headers():  # e.g. a 405's Allow
            if name.lower() != "content-type":
                response.headers[name] = value
        return response

    def _http_error_body(exc: HTTPException):
        status = exc.code or 500
        if status == 413:
            return error_response(413, "The request body is too large.", code="request_too_large")
        if status == 404:
            return error_response(404, "Not found.", code="not_found")
        if status == 405:
            return error_response(405, "Method not allowed.", code="method_not_allowed")
        return error_response(status, exc.description or exc.name, code=exc.name.lower().replace(" ", "_"))

    @app.errorhandler(DBAPIError)
    def _database_down(exc: DBAPIError):
        if not isinstance(exc, (OperationalError, InterfaceError)) and not exc.connection_invalidated:
            return _unexpected(exc)
        log.warning("database unavailable: %s", type(exc.orig).__name__ if exc.orig else exc)
        return error_response(
            503,
            "The database is unavailable; nothing was stored. Try again shortly.",
            type="server_error",
            code="database_unavailable",
        )

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error")
        return error_response(
            500, "The server had an error while processing your request.", type="server_error", code="internal_error"
        )
