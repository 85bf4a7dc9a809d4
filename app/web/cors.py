"""CORS for browsers calling the API from other origins, off unless IMAGEGATE_CORS_ORIGINS names some.

Keys travel in the Authorization header, never in cookies, so credentials are not allowed: a page on
an allowed origin still needs a key to do anything.
"""

from __future__ import annotations

from flask import Flask, Response, request

ALLOWED_HEADERS = "Authorization, Content-Type, Idempotency-Key"
ALLOWED_METHODS = "GET, POST, OPTIONS"
# Response headers a page may read besides the simple ones.
EXPOSED_HEADERS = (
    "x-request-id, Idempotent-Replayed, Retry-After, x-ratelimit-limit-requests, x-ratelimit-remaining-requests, "
    "x-ratelimit-reset-requests, x-ratelimit-limit-images, x-ratelimit-remaining-images, x-ratelimit-reset-images"
)
PREFLIGHT_MAX_AGE_S = 600


def parse_origins(text: str) -> frozenset[str]:
    return frozenset(origin.strip().rstrip("/") for origin in text.split(",") if origin.strip())


def enable_cors(app: Flask, origins_setting: str) -> None:
    origins = parse_origins(origins_setting)
    if not origins:
        return
    any_origin = "*" in origins

    def allowed(origin: str | None) -> bool:
        return bool(origin) and (any_origin or origin in origins)

    @app.before_request
    def _preflight():
        # Answered before authentication: a browser sends no Authorization header on a preflight.
        if request.method == "OPTIONS" and request.headers.get("Access-Control-Request-Method"):
            response = Response(status=204)
            if allowed(request.headers.get("Origin")):
                response.headers["Access-Control-Allow-Methods"] = ALLOWED_METHODS
                response.headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
                response.headers["Access-Control-Max-Age"] = str(PREFLIGHT_MAX_AGE_S)
            return response
        return None

    @app.after_request
    def _allow_origin(response: Response) -> Response:
        origin = request.headers.get("Origin")
        if allowed(origin):
            response.headers["Access-Control-Allow-Origin"] = "*" if any_origin else origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
        response.vary.add("Origin")
        return response
