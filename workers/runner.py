"""One attempt of one task: claim it, call the adapter, store the outcome.

Every write is a guarded transition in app.store; a duplicate delivery claims nothing and so
calls nothing. Retries are new Celery messages with a countdown, never a sleep in the worker.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import httpx
from celery import Celery
from pydantic import ValidationError

from app.events import TaskEvents
from app.providers import ModelConfig
from app.queue import publish_run
from app.schemas import GenerationRequest
from app.settings import Settings
from app.states import ErrorCode
from app.store import Claim, Failure, TaskStore, parse_task_id
from workers.adapters.base import UpstreamError
from workers.images import fetch_images
from workers.retry import backoff_s

log = logging.getLogger(__name__)


@dataclass
class TaskRunner:
    settings: Settings
    store: TaskStore
    models: dict[str, ModelConfig]
    adapters: dict[str, type]
    http: httpx.Client
    events: TaskEvents
    celery: Celery

    def run(self, task_id: str, attempt: int, *, worker: str) -> None:
        parsed = parse_task_id(task_id)
        claim = self.store.claim(parsed, attempt, worker=worker) if parsed else None
        if claim is None:
            log.info("task %s attempt %s: not claimable (duplicate delivery or already ended)", task_id, attempt)
            return
        log.info("task %s attempt %s: claimed by %s", task_id, attempt, worker)
        try:
            self._attempt(claim)
        except UpstreamError as exc:
            self._failed(claim, exc)
        except Exception:
            log.exception("task %s attempt %s: unexpected error", task_id, attempt)
            self._end_failed(claim, Failure(ErrorCode.INTERNAL, "The gateway failed while running this task."))

    def _attempt(self, claim: Claim) -> None:
        config = self.models.get(claim.model)
        if config is None:
            raise UpstreamError(ErrorCode.MISCONFIGURED, f"model {claim.model!r} is no longer configured", False)
        try:
            request = GenerationRequest.model_validate(claim.request)
        except ValidationError:
            raise UpstreamError(ErrorCode.INTERNAL, "stored request no longer validates", False) from None
        adapter = self.adapters[config.adapter](config, self.http, self._upstream_key(config))
        generation = adapter.generate(request)
        images = fetch_images(generation.images, client=self.http, config=config, settings=self.settings)
        if self.store.succeed(claim, images, generation.usage, generation.upstream_status):
            log.info("task %s attempt %s: succeed with %d image(s)", claim.task_id, claim.attempt, len(images))
            self._announce(claim)

    @staticmethod
    def _upstream_key(config: ModelConfig) -> str | None:
        if not config.api_key_env:
            return None
        key = os.environ.get(config.api_key_env)
        if not key:
            raise UpstreamError(ErrorCode.MISCONFIGURED,
                                f"the environment variable {config.api_key_env} holding the upstream key is not set",
                                retryable=False)
        return key

    def _failed(self, claim: Claim, exc: UpstreamError) -> None:
        failure = Failure(exc.code, exc.message, exc.details, exc.upstream_status)
        if not exc.retryable or claim.attempt > claim.max_retries:
            self._end_failed(claim, failure)
            return
        delay = backoff_s(claim.attempt, base_s=self.settings.retry_base_s, max_s=self.settings.retry_max_s,
                          retry_after_s=exc.retry_after_s)
        if self.store.retry_later(claim, failure):
            log.info("task %s attempt %s: %s; retrying in %.1f s", claim.task_id, claim.attempt, exc, delay)
            publish_run(self.celery, claim.task_id, claim.attempt + 1, countdown=delay)

    def _end_failed(self, claim: Claim, failure: Failure) -> None:
        if self.store.fail(claim, failure):
            log.info("task %s attempt %s: failed (%s: %s)", claim.task_id, claim.attempt, failure.code,
                     failure.message)
            self._announce(claim)

    def _announce(self, claim: Claim) -> None:
        try:
            self.events.announce(str(claim.task_id))
        except Exception as exc:  # waiters re-read the task on reconnect; the result is stored
            log.warning("could not announce the end of task %s: %s", claim.task_id, exc)
