"""Serve the API with gunicorn's gevent workers: a waiting synchronous request is a greenlet,
not an OS thread, so hundreds can wait at once."""

from __future__ import annotations

import os
from typing import Any

from gunicorn import glogging, util
from gunicorn.app.base import BaseApplication
from gunicorn.http import wsgi

from imagegate.app.logs import clear_contextvars
from imagegate.app.os_limits import allow_open_files
from imagegate.app.settings import Settings


class GunicornLogger(glogging.Logger):
    """gunicorn's own lines and its access log go through the process's log setup (app/logs.py):
    one format, and one event per request with its fields instead of the combined-log-format
    line (whose URL carried the signatures of image URLs; the redactor cuts those from `query`)."""

    def setup(self, cfg) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in [handler for handler in log.handlers if getattr(handler, "_gunicorn", False)]:
                log.removeHandler(handler)
            log.propagate = True

    def access(self, resp, req, environ, request_time) -> None:
        status = resp.status.split(None, 1)[0] if isinstance(resp.status, str) else resp.status
        fields = {
            "method": environ.get("REQUEST_METHOD"),
            "path": environ.get("PATH_INFO"),
            "query": environ.get("QUERY_STRING") or None,
            "status": int(status),
            "duration_s": round(request_time.total_seconds(), 6),
            "bytes": getattr(resp, "sent", None),
            "remote_addr": environ.get("REMOTE_ADDR"),
            "user_agent": environ.get("HTTP_USER_AGENT"),
        }
        # The request's context (request_id, api_key_id, task_id) is still bound in this greenlet:
        # the line carries it, then the context ends with the request.
        extra = {name: value for name, value in fields.items() if value is not None}
        self.access_log.info("%s %s %s", fields["method"], fields["path"], status, extra=extra)
        clear_contextvars()


# A reply body up to this size goes out in the same send as the headers.
ONE_SEND_MAX_BYTES = 64 * 1024


class _Held:
    """Stands in for the socket while a response's headers and first bytes are written."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.chunks.append(data)


class OneSendResponse(wsgi.Response):
    """gunicorn's response, with the headers and a small body sent in one send instead of two:
    on loopback and behind a proxy each send is a syscall and a TCP segment the client wakes for,
    about a tenth of an async submit's CPU. Later writes and chunked bodies are gunicorn's own."""

    def write(self, arg: bytes) -> None:
        if self.headers_sent or self.chunked or not isinstance(arg, bytes) or len(arg) > ONE_SEND_MAX_BYTES:
            return super().write(arg)
        sock, held = self.sock, _Held()
        self.sock = held
        try:
            super().write(arg)
        finally:
            self.sock = sock
        if held.chunks:
            util.write(sock, b"".join(held.chunks))


class ApiServer(BaseApplication):
    def __init__(self, settings: Settings, options: dict[str, Any]):
        self._settings = settings
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self):
        from imagegate.app.web import create_app  # after gevent patched this worker process

        # gunicorn's request handling builds `wsgi.Response` by name; this worker process builds ours.
        wsgi.Response = OneSendResponse  # type: ignore[misc]

        return create_app(self._settings)


def _forget_dead_worker(server, worker) -> None:
    """gunicorn's child_exit hook: in prometheus-client's multiprocess mode a dead worker's live
    gauges must go (its counters stay, so the totals never go back)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def serve(settings: Settings, *, host: str, port: int, workers: int, connections: int) -> None:
    allow_open_files(connections + 256)  # + the database and Redis pools, logs, the listener
    ApiServer(
        settings,
        {
            "bind": f"{host}:{port}",
            "workers": workers,
            "worker_class": "gevent",
            "worker_connections": connections,
            # A synchronous request may wait IMAGEGATE_SYNC_TIMEOUT_S; never kill it before that.
            "timeout": int(settings.sync_timeout_s) + 60,
            "graceful_timeout": 30,
            # Idle keep-alive connections stay open longer than clients keep them (httpx, so the openai SDK:
            # 5 s): with gunicorn's 2 s a client reusing a connection the server was closing got
            # "Server disconnected without sending a response".
            "keepalive": 75,
            "accesslog": "-",
            "logger_class": GunicornLogger,
            "loglevel": settings.log_level.lower(),
            # gunicorn's control socket is one fixed path per user: several servers on a host would clash.
            "control_socket_disable": True,
            # gunicorn answers an over-long request line itself, with an HTML page: allow its maximum.
            "limit_request_line": 8190,
            "child_exit": _forget_dead_worker,
        },
    ).run()
