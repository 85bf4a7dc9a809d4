"""The dashboard's pages and forms. Reads go through `reads`; redelivering goes the same way as
POST /v1/webhooks/deliveries/{id}/redeliver, under the same per-key rate limit."""

from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, current_app, flash, g, redirect, render_template, request, url_for
from sqlalchemy.exc import InterfaceError, OperationalError
from werkzeug.exceptions import HTTPException

from imagegate.app.ids import parse_id
from imagegate.app.image_urls import signed_image_url
from imagegate.app.queue import broker_client
from imagegate.app.state.tasks import ENDED, TaskStatus
from imagegate.app.web.dashboard import access, reads
from imagegate.app.web.services import services
from imagegate.app.web.webhooks import redeliver_refused

log = logging.getLogger(__name__)

bp = Blueprint(
    "dashboard",
    __name__,
    url_prefix="/dashboard",
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)

REFRESH_S = 5  # pages showing work in progress reload themselves this often
PUBLIC_ENDPOINTS = {"dashboard.signin", "dashboard.static"}
LONG_TEXT = 400  # request fields longer than this (base64 input images) are shown cut


# -- every request --------------------------------------------------------------------------------
@bp.before_request
def _signed_in_only():
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    svc = services()
    g.viewer = access.viewer(svc.settings, svc.engine)
    if g.viewer is None:
        return redirect(url_for(".signin", next=request.full_path.rstrip("?")))
    if request.method == "POST" and not access.csrf_ok(request.form.get("csrf")):
        return _expired_form()
    return None


@bp.after_request
def _headers(response):
    settings = services().settings
    image_origin = "{0.scheme}://{0.netloc}".format(urlsplit(settings.public_url))
    # Scripts, styles and forms from this gateway only; images from it and from the public URL that
    # signs them; never framed (the redeliver button must not be clickable through someone's page).
    response.headers["Content-Security-Policy"] = (
        f"default-src 'self'; img-src 'self' {image_origin}; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
    )
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    if request.endpoint != "dashboard.static":  # pages carry signed image URLs: keep them out of caches
        response.headers["Cache-Control"] = "no-store"
    return response


@bp.app_template_filter("ago")
def _ago(moment: datetime | None) -> str:
    if moment is None:
        return ""
    seconds = max(0, int(time.time() - moment.timestamp()))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


@bp.app_template_filter("utc")
def _utc(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else ""


@bp.app_template_filter("duration")
def _duration(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return ""
    seconds = (end - start).total_seconds()
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


@bp.context_processor
def _template_helpers() -> dict[str, Any]:
    settings = services().settings

    def image_url(image_id: uuid.UUID, content_type: str) -> str:
        return signed_image_url(
            settings.public_url, settings.secret_key, image_id, content_type, settings.image_url_ttl_s
        )

    return {"csrf_token": access.csrf_token, "image_url": image_url, "viewer": g.get("viewer")}


def _page(template: str, status: int = 200, *, refresh: bool = False, **context):
    """A signed-in page: its content, the health strip, and whether it reloads itself."""
    svc = services()
    health = reads.health(svc.engine, _broker(), g.viewer.key_id, svc.settings.task_deadline_s)
    return render_template(template, health=health, refresh_s=REFRESH_S if refresh else None, **context), status


def _broker():
    """What counts the queue depths (one per app, made on first use), None for the filesystem broker."""
    state = current_app.extensions.setdefault("imagegate.dashboard", {})
    if "broker" not in state:
        state["broker"] = broker_client(services().settings, timeout_s=1)
    return state["broker"]


def _not_found(what: str):
    return _page("dashboard/error.html", 404, title="Not found", message=f"No {what} here, or not yours to see.")


def _expired_form():
    # Signed-out pages (sign-in) have no health strip, so this one renders without it.
    message = "This form has expired or cookies are off. Reload the page and try again."
    return render_template("dashboard/error.html", title="Form expired", message=message), 400


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException):
    return render_template("dashboard/error.html", title=exc.name, message=exc.description), exc.code or 500


@bp.errorhandler(OperationalError)
@bp.errorhandler(InterfaceError)
def _database_down(exc: Exception):
    log.warning("dashboard: database unavailable: %s", type(exc).__name__)
    message = "The database is unavailable. Try again shortly."
    return render_template("dashboard/error.html", title="Database unavailable", message=message), 503


@bp.errorhandler(Exception)
def _unexpected(exc: Exception):
    log.exception("dashboard: unhandled error")
    message = "The dashboard could not show this page; the server's log has the error."
    return render_template("dashboard/error.html", title="Something went wrong", message=message), 500


# -- signing in and out ---------------------------------------------------------------------------
def _safe_next(target: str | None) -> str:
    """Only a dashboard path: a link must not send someone elsewhere after signing in."""
    if target and target.startswith("/dashboard") and not target.startswith("//") and "\\" not in target:
        return target
    return url_for(".tasks")


@bp.route("/signin", methods=["GET", "POST"])
def signin():
    svc = services()
    admin_enabled = bool(svc.settings.admin_token and svc.settings.admin_token.get_secret_value())
    next_page = _safe_next(request.values.get("next"))
    if request.method == "GET":
        return render_template("dashboard/signin.html", admin_enabled=admin_enabled, next=next_page)
    if not access.csrf_ok(request.form.get("csrf")):
        return _expired_form()
    if access.sign_in(request.form.get("secret", ""), svc.settings, svc.keys):
        return redirect(next_page, 303)
    error = "That API key or admin token is not valid." if admin_enabled else "That API key is not valid."
    return render_template("dashboard/signin.html", admin_enabled=admin_enabled, next=next_page, error=error), 401


@bp.post("/signout")
def signout():
    access.sign_out()
    return redirect(url_for(".signin"), 303)


# -- tasks ------------------------------------------------------------------------------------------
def _filters() -> tuple[reads.TaskFilter, dict[str, str]]:
    """The list's filters from the query string, and the values to keep in its links (bad ones dropped)."""
    args = request.args
    status = args.get("status") if args.get("status") in set(TaskStatus) else None
    model = (args.get("model") or "").strip()[:200] or None
    batch_id = parse_id((args.get("batch") or "").strip())
    key_id = parse_id(args.get("key") or "") if g.viewer.is_admin else g.viewer.key_id
    kept = {"status": status, "model": model, "batch": batch_id, "key": key_id if g.viewer.is_admin else None}
    return (
        reads.TaskFilter(api_key_id=key_id, status=status, model=model, batch_id=batch_id),
        {name: str(value) for name, value in kept.items() if value},
    )


@bp.get("/")
def tasks():
    svc = services()
    filters, kept = _filters()
    before = reads.Cursor.decode(request.args.get("before"))
    page = reads.tasks_page(svc.engine, filters, before)
    models = list(svc.models)
    if filters.model and filters.model not in models:
        models.append(filters.model)  # a model since removed from the providers file, still in history
    return _page(
        "dashboard/tasks.html",
        refresh=before is None,
        page=page,
        kept=kept,
        older=url_for(".tasks", **kept, before=page.next.encode()) if page.next else None,
        newest=url_for(".tasks", **kept) if before else None,
        statuses=list(TaskStatus),
        models=models,
        keys=reads.keys(svc.engine) if g.viewer.is_admin else [],
    )


def _shown(value: Any) -> Any:
    """The stored request as shown: long strings (base64 images) cut, with their length."""
    if isinstance(value, str) and len(value) > LONG_TEXT:
        return f"{value[:LONG_TEXT]}… ({len(value):,} characters)"
    if isinstance(value, dict):
        return {name: _shown(item) for name, item in value.items()}
    if isinstance(value, list):
        return [_shown(item) for item in value]
    return value


@bp.get("/tasks/<task_id>")
def task(task_id: str):
    svc = services()
    parsed = parse_id(task_id)
    record = svc.tasks.get(parsed, api_key_id=g.viewer.key_id) if parsed else None
    if record is None:  # missing, malformed or another key's: one answer, as the API gives
        return _not_found("task")
    task = record.task
    return _page(
        "dashboard/task.html",
        refresh=task.status not in ENDED,
        task=task,
        images=record.images,
        attempts=record.attempts,
        deliveries=svc.webhooks.deliveries(task.api_key_id, task_id=task.id),
        key_name=reads.key_name(svc.engine, task.api_key_id) if g.viewer.is_admin else g.viewer.name,
        request_json=json.dumps(_shown(task.request), indent=2, ensure_ascii=False),
    )


@bp.post("/deliveries/<delivery_id>/redeliver")
def redeliver(delivery_id: str):
    svc = services()
    parsed = parse_id(delivery_id)
    owner = reads.delivery_owner(svc.engine, parsed) if parsed else None
    if owner is None or not (g.viewer.is_admin or owner.api_key_id == g.viewer.key_id):
        return _not_found("delivery")
    back = url_for(".task", task_id=owner.task_id) if owner.task_id else url_for(".batches")
    if refused := redeliver_refused(owner.api_key_id):
        rate, wait_s = refused
        flash(f"Too many redeliveries for this key (at most {rate}); try again in {wait_s} s.", "error")
        return redirect(back, 303)
    event_id = svc.webhooks.redeliver(owner.api_key_id, parsed)
    if event_id is None:
        return _not_found("delivery")
    svc.after_end.send([event_id])
    flash(f"Event {event_id} queued for delivery again.", "ok")
    return redirect(back, 303)


# -- batches ----------------------------------------------------------------------------------------
@bp.get("/batches")
def batches():
    svc = services()
    before = reads.Cursor.decode(request.args.get("before"))
    page = reads.batches_page(svc.engine, g.viewer.key_id, before)
    return _page(
        "dashboard/batches.html",
        refresh=before is None,
        page=page,
        older=url_for(".batches", before=page.next.encode()) if page.next else None,
        newest=url_for(".batches") if before else None,
    )
