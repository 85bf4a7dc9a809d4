"""The intake API: create_app(settings) builds a Flask app wired to the database and broker."""

from __future__ import annotations

from flask import Flask
from sqlalchemy import text

from app.keys import KeyCache
from app.providers import load_models
from app.queue import reuse_publish_client
from app.runtime import build_runtime
from app.settings import Settings
from app.web import batches, files, images, openapi, webhooks
from app.web.errors import error_response, register_error_handlers
from app.web.limits import ClientLimit
from app.web.services import Services, services


def create_app(settings: Settings | None = None) -> Flask:
    settings = (settings or Settings()).check()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False

    runtime = build_runtime(settings)
    reuse_publish_client(runtime.celery)
    app.extensions["imagegate"] = Services.of(runtime, models=load_models(settings.providers_file),
                                              keys=KeyCache(runtime.sessions, settings.key_cache_ttl_s))

    app.wsgi_app = ClientLimit(app.wsgi_app, settings.max_requests_per_client)  # type: ignore[method-assign]
    register_error_handlers(app)
    app.register_blueprint(batches.bp)  # before images: /v1/images/batches is not a task id
    app.register_blueprint(images.bp)
    app.register_blueprint(webhooks.bp)
    app.register_blueprint(files.bp)
    app.register_blueprint(openapi.bp)

    @app.get("/healthz")
    def healthz():
        try:
            with services().sessions() as session:
                session.execute(text("SELECT 1"))
        except Exception:
            return error_response(503, "The database is unreachable.", type="server_error", code="database_unavailable")
        return {"status": "ok"}

    return app
