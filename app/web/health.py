"""Probes: /healthz says the process answers (no database call, so a database outage does not get
every API process restarted); /readyz says it can serve: database and broker reachable, schema at
the newest migration. /readyz also lists the workers and sweepers seen in the last minute, without
failing on none: the API accepts asynchronous tasks with no worker running (they wait, pending, for
one), and workers may be scaled to zero while the API keeps taking requests."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask
from sqlalchemy import Connection, text

from imagegate.app.heartbeats import recent
from imagegate.app.queue import broker_client
from imagegate.app.settings import Settings
from imagegate.app.web.errors import error_response
from imagegate.app.web.services import services

log = logging.getLogger(__name__)

OK = "ok"
SEEN_WITHIN_S = 60.0
BROKER_TIMEOUT_S = 2.0


class Readiness:
    """What /readyz checks, with what is worth keeping between probes: the migrations' head (it
    changes only with the installed code) and the broker client."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._head: str | None = None
        self._broker = None

    def migrations_head(self) -> str | None:
        if self._head is None:
            from alembic.script import ScriptDirectory

            from imagegate.app.migrate import alembic_config

            self._head = ScriptDirectory.from_config(alembic_config(self.settings.database_url)).get_current_head()
        return self._head

    def broker(self) -> str:
        if self.settings.uses_redis or self.settings.uses_amqp:
            if self._broker is None:
                self._broker = broker_client(self.settings, timeout_s=BROKER_TIMEOUT_S)
            try:
                self._broker.ping()
            except Exception as exc:  # redis, kombu and socket errors alike: the broker does not answer
                log.warning("readyz: broker unreachable: %s", exc)
                return f"unreachable ({type(exc).__name__})"
            return OK
        if self.settings.uses_filesystem:
            folder = self.settings.data_dir / "broker"  # type: ignore[operator]
            return OK if folder.is_dir() else "its folder is missing"
        return "not checked"

    def migrations(self, connection: Connection) -> str:
        from alembic.migration import MigrationContext

        current, head = MigrationContext.configure(connection).get_current_revision(), self.migrations_head()
        return OK if current == head else f"at {current or 'no revision'}, head is {head}: run `imagegate db upgrade`"


def _processes_seen() -> dict[str, Any]:
    seen = recent(services().engine, within_s=SEEN_WITHIN_S)
    return {
        "workers": sum(1 for process in seen if process.kind == "worker"),
        "sweepers": sum(1 for process in seen if process.kind == "sweeper"),
        "processes": [
            {"kind": p.kind, "hostname": p.hostname, "pid": p.pid, "seen_at": p.seen_at.isoformat()} for p in seen
        ],
    }


def register_probes(app: Flask, settings: Settings) -> None:
    readiness = Readiness(settings)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        checks = {"database": OK, "broker": readiness.broker(), "migrations": "not checked"}
        try:
            with services().engine.connect() as connection:
                connection.execute(text("SELECT 1"))
                checks["migrations"] = readiness.migrations(connection)
        except Exception as exc:
            log.warning("readyz: database unreachable: %s", type(exc).__name__)
            checks["database"] = f"unreachable ({type(exc).__name__})"
        # The heartbeats table exists once the schema is at head.
        processes = _processes_seen() if checks["database"] == checks["migrations"] == OK else {}
        failing = {name: result for name, result in checks.items() if result not in (OK, "not checked")}
        if failing:
            message = "Not ready: " + "; ".join(f"{name} {result}" for name, result in failing.items()) + "."
            return error_response(503, message, type="server_error", code="not_ready", checks=checks, **processes)
        return {"status": "ready", "checks": checks, **processes}
