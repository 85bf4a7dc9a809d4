"""/dashboard: server-rendered pages for the people who run imagegate: tasks, one task's attempts and
webhook deliveries, batches, and a health strip. Signed in with an API key (its own tasks) or the
admin token (every key's)."""

from __future__ import annotations

from datetime import timedelta

from flask import Flask, Request
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface

from imagegate.app.settings import Settings

SESSION_HOURS = 12
PATH = "/dashboard"


class DashboardSessions(SecureCookieSessionInterface):
    """Flask's signed-cookie session, opened only under /dashboard: elsewhere a request gets Flask's
    null session, without building the signing serializer (a measurable part of an API request)."""

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        if request.path != PATH and not request.path.startswith(PATH + "/"):
            return None
        return super().open_session(app, request)


def register(app: Flask, settings: Settings) -> None:
    """Mount the dashboard and configure the session cookie it signs in with (the API itself keeps
    no session, so these settings are the dashboard's alone)."""
    from imagegate.app.web.dashboard.views import bp

    app.secret_key = settings.secret_key
    app.session_interface = DashboardSessions()
    app.config.update(
        SESSION_COOKIE_NAME="imagegate_dashboard",
        SESSION_COOKIE_PATH=PATH,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.public_url.startswith("https://"),
        PERMANENT_SESSION_LIFETIME=timedelta(hours=SESSION_HOURS),
    )
    app.register_blueprint(bp)
