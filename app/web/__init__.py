"""The intake API: create_app(settings) builds a Flask app wired to the database and broker."""

from __future__ import annotations

from pathlib import Path

from flask import Flask

from imagegate.app.keys import KeyCache
from imagegate.app.providers import load_models
from imagegate.app.queue import reuse_publish_client
from imagegate.app.runtime import build_runtime
from imagegate.app.settings import Settings
from imagegate.app.web import batches, dashboard, edits, files, images, models, openapi, task_reads, usage, webhooks
from imagegate.app.web.cors import enable_cors
from imagegate.app.web.errors import register_error_handlers
from imagegate.app.web.health import register_probes
from imagegate.app.web.key_limits import register_key_limits
from imagegate.app.web.limits import ClientLimit
from imagegate.app.web.metrics import bp as metrics_bp
from imagegate.app.web.request_ids import register_request_ids
from imagegate.app.web.services import Services

# The API's connections stay open (no overflow): with 10 + 20 overflow, every request past the
# tenth in a transaction opened a Postgres connection and closed it after its commit, which cost
# more Postgres CPU than the INSERT. Opened lazily; a request past the twentieth waits for a free one.
API_POOL_SIZE = 20


def create_app(settings: Settings | None = None) -> Flask:
    settings = (settings or Settings()).check()
    # An explicit instance path (never used): Flask's search for one fails on the `imagegate`
    # namespace package of an editable install.
    app = Flask(__name__, instance_path=str(Path(__file__).with_name("instance")))
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False

    runtime = build_runtime(settings, pool_size=API_POOL_SIZE, max_overflow=0)
    reuse_publish_client(runtime.celery)
    app.extensions["imagegate"] = Services.of(
        runtime, models=load_models(settings.providers_file), keys=KeyCache(runtime.sessions, settings.key_cache_ttl_s)
    )

    app.wsgi_app = ClientLimit(app.wsgi_app, settings.max_requests_per_client)  # type: ignore[method-assign]
    app.register_blueprint(metrics_bp)  # first: its clock starts before any other blueprint's hook runs
    register_error_handlers(app)
    enable_cors(app, settings.cors_origins)
    register_request_ids(app)
    register_key_limits(app, settings)
    app.register_blueprint(batches.bp)  # before images: /v1/images/batches is not a task id
    app.register_blueprint(images.bp)
    app.register_blueprint(edits.bp)
    app.register_blueprint(task_reads.bp)
    app.register_blueprint(models.bp)
    app.register_blueprint(usage.bp)
    app.register_blueprint(webhooks.bp)
    app.register_blueprint(files.bp)
    app.register_blueprint(openapi.bp)
    register_probes(app, settings)
    dashboard.register(app, settings)
    return app
