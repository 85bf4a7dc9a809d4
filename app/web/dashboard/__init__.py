"""/dashboard: server-rendered pages for the people who run imagegate: tasks, one task's attempts and
webhook deliveries, batches, and a health strip. Signed in with an API key (its own tasks) or the
admin token (every key's)."""

from __future__ import annotations

from datetime import timedelta

from flask import Flask

from imagegate.app.settings import Settings

SESSION_HOURS = 12


def register(app: Flask, settings: Settings) -> None:
    """Mount the dashboard and configure the session cookie it signs in with (the API itself keeps
    no session, so these settings are the dashboard's alone)."""
    from imagegate.app.web.dashboard.views import bp

    app.secret_key = settings.secret_key
    app.config.update(
        SESSION_COOKIE_NAME="imagegate_dashboard",
        SESSION_COOKIE_PATH="/dashboard",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.public_url.startswith("https://"),
        PERMANENT_SESSION_LIFETIME=timedelta(hours=SESSION_HOURS),
    )
    app.register_blueprint(bp)
