"""One log format for every process: JSON lines for machines, readable text for a person.

`configure_logging` is called once at the start of each process. The standard library's loggers
(Celery, gunicorn, Alembic, our own `logging.getLogger(__name__)`) and structlog's go through the
same processors, so every line carries timestamp, level, logger, event and process, plus the context
bound for the task or request in hand (`task_id`, `attempt`, `model`, `api_key_id`, `batch_id`,
`request_id`, bound with `bound_contextvars`), and every string in it passes the redactor last.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, Literal, TypeVar

import structlog
from pydantic import SecretStr
from structlog.contextvars import bind_contextvars, bound_contextvars, clear_contextvars, merge_contextvars
from structlog.stdlib import ProcessorFormatter
from structlog.typing import EventDict, WrappedLogger

from imagegate.app.redaction import Redactor
from imagegate.app.settings import Settings

__all__ = ["bind_contextvars", "bound_contextvars", "clear_contextvars", "configure_logging", "in_this_context"]

Process = Literal["api", "worker", "sweeper", "cli"]
T = TypeVar("T")
# A configured value shorter than this is no credential worth hiding, and would blank common words.
MIN_LITERAL_SECRET = 8


class Redact:
    """The last step before rendering: every string of the event (the message, every field, a
    formatted traceback) loses whatever looks like a credential or is one of the known secrets."""

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor

    def __call__(self, _: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
        # Most lines hold no secret and only flat values: one search over all their strings lets
        # them through as they are (a redaction per field was ~a third of a line's cost).
        values = event_dict.values()
        if not any(isinstance(value, (dict, list)) for value in values) and self._redactor.clean(
            value for value in values if isinstance(value, str)
        ):
            return event_dict
        return {key: self._redactor.value(value) for key, value in event_dict.items()}


def known_secrets(settings: Settings) -> Iterator[str]:
    """The secrets this process was configured with, redacted verbatim whatever their shape: the
    URL-signing key, every SecretStr setting, and the upstream keys the providers file names."""
    from imagegate.app.providers import ProvidersFileError, load_models

    yield settings.secret_key
    for _, value in settings:
        if isinstance(value, SecretStr):
            yield value.get_secret_value()
    try:
        models = load_models(settings.providers_file)
    except (ProvidersFileError, OSError):  # the command that needs the file reports it
        return
    for model in models.values():
        if model.api_key_env:
            yield os.environ.get(model.api_key_env, "")


def configure_logging(settings: Settings, process: Process) -> bool:
    """Send every log line of this process to stderr in one format; True when it is JSON lines.
    Calling it again replaces the previous setup."""
    stream = sys.stderr
    as_json = settings.log_format == "json" or (settings.log_format == "auto" and not stream.isatty())
    redactor = Redactor(secret for secret in known_secrets(settings) if len(secret) >= MIN_LITERAL_SECRET)

    def add_process(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
        event_dict.setdefault("process", process)
        return event_dict

    shared = [
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        add_process,
        merge_contextvars,
        structlog.stdlib.ExtraAdder(),  # fields passed as `extra=` (gunicorn's access log)
    ]
    renderer = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback)
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,  # a traceback is text before it is redacted
                Redact(redactor),
                renderer,
            ],
        )
    )
    # No line renders the thread, the process id or the caller's file and line: the standard library
    # need not gather them for every record (its documented "Optimization" switches).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(settings.log_level)
    # Alembic announces each of its plugins at INFO when imported: noise above a command's own line.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    logging.captureWarnings(True)
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    if process == "worker":
        _keep_celery_off_the_root_logger()
    return as_json


def _keep_celery_off_the_root_logger() -> None:
    """A receiver of Celery's setup_logging signal tells the worker that logging is configured
    already: it then adds no handler of its own and only the worker's --loglevel is applied."""
    from celery.signals import setup_logging

    setup_logging.connect(_apply_celery_loglevel, weak=False)


def _apply_celery_loglevel(loglevel: int | str | None = None, **_: Any) -> None:
    if loglevel:
        logging.getLogger().setLevel(loglevel)


def in_this_context(func: Callable[..., T]) -> Callable[..., T]:
    """`func`, run in a copy of the caller's context each time it is called: a pool's threads (or
    greenlets) start with an empty one, which would lose the task's log context."""
    context = contextvars.copy_context()

    def run(*args: Any, **kwargs: Any) -> T:
        return context.copy().run(func, *args, **kwargs)

    return run
