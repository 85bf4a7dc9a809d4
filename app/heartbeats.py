"""Heartbeats: every worker and sweeper process rewrites its own row while it lives, so /readyz and
the dashboard can tell which processes were seen lately, on any host, from Postgres alone (the
embedded mode has no Redis)."""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, delete, insert, select, update

from imagegate.app.models import Heartbeat, utcnow

log = logging.getLogger(__name__)

INTERVAL_S = 15.0
# Rows of processes not seen for this long are deleted by the sweeper's pass.
FORGET_AFTER_S = 24 * 3600.0


@dataclass(frozen=True)
class Seen:
    kind: str
    hostname: str
    pid: int
    started_at: datetime
    seen_at: datetime
    info: dict[str, Any]


class Heart:
    """One process's heartbeat: `beat()` writes it now; `start()` keeps writing it every INTERVAL_S."""

    def __init__(self, engine: Engine, kind: str, info: dict[str, Any] | None = None):
        self.engine, self.kind, self.info = engine, kind, info or {}
        self.hostname, self.pid, self.started_at = socket.gethostname(), os.getpid(), utcnow()
        self.id = f"{kind}:{self.hostname}:{self.pid}"
        self._stop = threading.Event()

    def beat(self) -> None:
        values = {"seen_at": utcnow(), "info": self.info}
        with self.engine.begin() as connection:
            if not connection.execute(update(Heartbeat).where(Heartbeat.id == self.id).values(**values)).rowcount:
                connection.execute(
                    insert(Heartbeat).values(
                        id=self.id,
                        kind=self.kind,
                        hostname=self.hostname,
                        pid=self.pid,
                        started_at=self.started_at,
                        **values,
                    )
                )

    def start(self) -> None:
        threading.Thread(target=self._run, name=f"heartbeat-{self.kind}", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
            except Exception as exc:  # a database outage: the next beat says we are alive again
                log.warning("heartbeat not written: %s", exc)
            self._stop.wait(INTERVAL_S)


def recent(engine: Engine, within_s: float = 60.0, kind: str | None = None) -> list[Seen]:
    """The processes seen within the last `within_s` seconds, newest first."""
    query = select(Heartbeat).where(Heartbeat.seen_at >= utcnow() - timedelta(seconds=within_s))
    if kind is not None:
        query = query.where(Heartbeat.kind == kind)
    with engine.connect() as connection:
        rows = connection.execute(query.order_by(Heartbeat.seen_at.desc())).all()
    return [Seen(row.kind, row.hostname, row.pid, row.started_at, row.seen_at, row.info) for row in rows]


def forget_old(engine: Engine, older_than_s: float = FORGET_AFTER_S) -> int:
    with engine.begin() as connection:
        cutoff = utcnow() - timedelta(seconds=older_than_s)
        return connection.execute(delete(Heartbeat).where(Heartbeat.seen_at < cutoff)).rowcount
