"""One attempt of one task: claim it, make its upstream calls, store the outcome.

Every write is a guarded transition of app.state.attempts; a duplicate delivery claims nothing and
so calls nothing. Retries, fallbacks and polls of asynchronous upstreams are new Celery messages
with a countdown, never a sleep in the worker.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import cast

import httpx
from celery import Celery
from pydantic import ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError

from imagegate.app.after_end import AfterEnd
from imagegate.app.edits import MASK, EditInputs, can_edit, split_stored
from imagegate.app.failures import ErrorCode, Failure
from imagegate.app.ids import parse_id
from imagegate.app.image_store import DatabaseImages, ImageStore
from imagegate.app.logs import bound_contextvars, in_this_context
from imagegate.app.models import utcnow
from imagegate.app.providers import ModelConfig
from imagegate.app.queue import publish_run
from imagegate.app.redaction import Redactor
from imagegate.app.schemas import EDIT_ONLY_FIELDS, GenerationRequest, generation_of
from imagegate.app.settings import Settings
from imagegate.app.state.refused import Outcome, Refused
from imagegate.app.stores.attempts import AttemptStore, CallOutcome, Claim, NewImage, Success
from imagegate.workers.adapters import Upstream, resolve_upstreams
from imagegate.workers.adapters.base import (
    Adapter,
    Generation,
    ImageAdapter,
    PollingAdapter,
    UpstreamError,
)
from imagegate.workers.announcements import handed_over_reply
from imagegate.workers.batch_closing import BatchClosing
from imagegate.workers.durable_writes import DurableWrites
from imagegate.workers.fanout import Call, merge_usage, plan_calls, slot_counts
from imagegate.workers.grouped import Grouped
from imagegate.workers.grouped_claims import GroupedClaims
from imagegate.workers.http import current_call
from imagegate.workers.images import fetch_images
from imagegate.workers.leases import LeaseKeeper
from imagegate.workers.model_admission import ModelAdmission
from imagegate.workers.model_gate import Granted
from imagegate.workers.model_limiter import ModelLimiter
from imagegate.workers.outbound import CheckedClients
from imagegate.workers.retry import backoff_s
from imagegate.workers.task_metrics import (
    attempt_running,
    count_ended,
    count_retry,
    count_started,
    count_stored,
    metered_call,
)

log = logging.getLogger(__name__)

MAX_POLL_INTERVAL_S = 30.0
# A stored error message is cut to this, after redaction: a secret cut in two would no longer match.
MAX_MESSAGE_CHARS = 1000


def _log_context(claim: Claim) -> dict[str, str]:
    context = {"model": claim.model, "route": claim.route, "api_key_id": str(claim.api_key_id)}
    return context | ({"batch_id": str(claim.batch_id)} if claim.batch_id else {})


@dataclass
class TaskRunner:
    settings: Settings
    store: AttemptStore
    leases: LeaseKeeper
    # Successes are written grouped across the tasks in flight (see workers.grouped).
    successes: Grouped[Success, Outcome]
    models: dict[str, ModelConfig]
    adapters: dict[str, type[Adapter]]
    http: httpx.Client
    after_end: AfterEnd
    celery: Celery
    # For image URLs off the model's own origin (see workers.images).
    checked: CheckedClients = dataclasses.field(default_factory=CheckedClients)
    # Where image bytes are put before the rows that point at them (IMAGEGATE_IMAGE_STORE).
    image_store: ImageStore = dataclasses.field(default_factory=DatabaseImages)
    # The per-model upstream limits (workers/model_limiter.py); None: none are kept.
    limiter: ModelLimiter | None = None
    # Each model bound to its adapter and upstream key, once; and the keys' redactor.
    upstreams: dict[str, Upstream] = dataclasses.field(init=False)
    redact: Redactor = dataclasses.field(init=False)
    batches: BatchClosing = dataclasses.field(init=False)
    admission: ModelAdmission = dataclasses.field(init=False)
    durable: DurableWrites = dataclasses.field(init=False)
    # Claims are made grouped across the tasks starting at once (see workers.grouped_claims).
    claims: GroupedClaims = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.batches = BatchClosing(lambda batch_id: self.after_end.batch_touched(batch_id))
        self.upstreams = resolve_upstreams(self.models, self.adapters)
        self.admission = ModelAdmission(self.upstreams, self.celery, self.limiter)
        self.durable = DurableWrites(self.store, self.leases, self.image_store)
        self.claims = GroupedClaims(self.store)
        self.redact = Redactor(upstream.api_key for upstream in self.upstreams.values())
        for name, upstream in self.upstreams.items():
            if upstream.unavailable:
                log.warning("model %r cannot be served: %s", name, upstream.unavailable)

    def run(self, task_id: str, attempt: int, poll: int = 0, *, worker: str, awaited: bool = False) -> None:
        """`awaited`: a synchronous request waits for this attempt, and takes its reply handed over."""
        # Every log line of the run carries the task's context, which ends with it (a pool's
        # thread goes on to other tasks; under gevent each task has a greenlet and its own context).
        with bound_contextvars(task_id=task_id, attempt=attempt):
            self._run(task_id, attempt, poll, worker=worker, awaited=awaited)

    def _run(self, task_id: str, attempt: int, poll: int, *, worker: str, awaited: bool) -> None:
        parsed = parse_id(task_id)
        if parsed is None:
            return
        lease_s = self.settings.lease_s
        if poll:
            claim, granted = self.store.claim_poll(parsed, attempt, poll, lease_s=lease_s), None
        else:  # under the model's upstream limits: room for the calls, or a wait (claim None)
            plan = functools.partial(plan_calls, self.upstreams)
            claim, granted = self.admission.claim(
                self.claims, parsed, attempt, worker=worker, lease_s=lease_s, plan=plan
            )
        if not claim:
            if claim is not None:
                log.info("task %s attempt %s poll %s: not claimed (%s)", task_id, attempt, poll, claim)
            return
        if awaited:
            claim = dataclasses.replace(claim, awaited=True)
        count_started(claim)
        try:
            with bound_contextvars(**_log_context(claim)), self.leases.held(claim), attempt_running():
                self._run_claimed(claim, granted)
        finally:
            self.admission.release(granted)

    def _run_claimed(self, claim: Claim, granted: Granted | None) -> None:
        try:
            upstream = self.upstreams.get(claim.route)
            if upstream is None:
                raise UpstreamError(ErrorCode.MISCONFIGURED, f"model {claim.route!r} is no longer configured", False)
            if upstream.unavailable:
                raise UpstreamError(ErrorCode.MISCONFIGURED, upstream.unavailable, False)
            if refusal := self.admission.refusal(upstream.config, len(claim.slots)):
                raise refusal
            fields, edit = split_stored(claim.request)
            request = GenerationRequest.model_validate(fields) if edit is None else generation_of(fields)
            if edit is not None and not (upstream.adapter.capabilities.edits and can_edit(upstream.config)):
                raise UpstreamError(ErrorCode.MISCONFIGURED, f"model {claim.route!r} cannot edit images", False)
            # An edit's files are read from the database by every attempt that calls (not by a poll).
            inputs = functools.partial(self._edit_inputs, claim, fields, edit) if edit is not None else None
            adapter = upstream.connect(self.http)
            if upstream.polling:  # declared by the adapter, checked when the adapters were loaded
                self._run_polling(claim, upstream.config, cast(PollingAdapter, adapter), request, granted, inputs)
            else:
                self._run_calls(claim, upstream, cast(ImageAdapter, adapter), request, granted, inputs and inputs())
        except UpstreamError as exc:  # before any call was made: the model cannot be served
            self._end_failed(claim, self._failure(exc), [])
        except ValidationError:
            self._end_failed(claim, Failure(ErrorCode.INTERNAL, "stored request no longer validates"), [])
        except (OperationalError, InterfaceError):  # reading an edit's files: the attempt is taken back
            raise  # when its lease expires, and the next one reads them again
        except Exception:
            log.exception("task %s attempt %s: unexpected error", claim.task_id, claim.attempt)
            self._end_failed(claim, Failure(ErrorCode.INTERNAL, "The gateway failed while running this task."), [])

    def _edit_inputs(self, claim: Claim, fields: dict, edit: dict) -> EditInputs:
        images, mask = self.store.inputs(claim.task_id)
        if len(images) != len(edit.get("images", ())) or (mask is None) == (MASK in edit):
            raise UpstreamError(ErrorCode.INTERNAL, "the task's input images are no longer stored", False)
        params = {name: value for name, value in fields.items() if name in EDIT_ONLY_FIELDS}
        return EditInputs(tuple(images), mask, params)

    # -- upstreams that answer with images ----------------------------------------------------
    def _run_calls(
        self,
        claim: Claim,
        upstream: Upstream,
        adapter: ImageAdapter,
        request: GenerationRequest,
        granted: Granted | None,
        inputs: EditInputs | None = None,
    ) -> None:
        config = upstream.config
        counts = slot_counts(request.n, upstream.max_images_per_call)
        todo = list(claim.slots)
        make, kind = (
            (functools.partial(adapter.edit, inputs=inputs), "edit") if inputs else (adapter.generate, "generate")
        )

        def call(slot: int) -> Call:
            single = request if len(counts) == 1 else request.model_copy(update={"n": counts[slot]})
            current_call.set(f"imagegate-{claim.task_id}-{claim.attempt}-{slot}")
            try:
                generation = metered_call(claim.route, kind, functools.partial(make, single))
                return self._stored(slot, generation, config)
            except UpstreamError as exc:
                return Call(slot, upstream_status=exc.upstream_status, error=exc)

        if len(todo) == 1:
            calls = [call(todo[0])]
        else:  # concurrent calls, no more than the model's slots; under the gevent pool, greenlets
            at_once = min(len(todo), granted.slots) if granted and granted.slots else len(todo)
            with ThreadPoolExecutor(max_workers=at_once) as pool:
                calls = list(pool.map(in_this_context(call), todo))
        self.admission.release(granted)  # the calls are over: give their room back before the write
        self._finish(claim, config, request, calls)

    def _stored(self, slot: int, generation: Generation, config: ModelConfig) -> Call:
        images = fetch_images(
            generation.images, client=self.http, checked=self.checked, config=config, settings=self.settings
        )
        return Call(
            slot,
            [dataclasses.replace(image, slot=slot) for image in images],
            generation.usage,
            generation.upstream_status,
        )

    def _finish(self, claim: Claim, config: ModelConfig, request: GenerationRequest, calls: list[Call]) -> None:
        outcomes = [
            CallOutcome(call.slot, call.upstream_status, self._failure(call.error) if call.error else None)
            for call in calls
        ]
        images = [image for call in calls for image in call.images]
        usage = claim.usage
        for call in calls:
            usage = merge_usage(usage, call.usage)
        errors = [call.error for call in calls if call.error]
        for error in errors:  # a 429 lowers the model's rate for every worker
            self.admission.answered(config, error)
        if not errors:
            images = self.durable.put(claim, images)
            if written := self.durable.write_pointing_at(
                claim, images, self.successes, Success(claim, images, usage, outcomes)
            ):
                log.info("task %s attempt %s: succeed via %s", claim.task_id, claim.attempt, claim.route)
                count_stored(claim, images)
                count_ended(claim, "succeed")
                self._announce(claim, handed_over_reply(claim, images, usage))
            else:
                self._stop_if_cancelled(claim, written)
            return
        # One refusal ends the task; otherwise retry (or fall back) the calls that failed.
        fatal = next((error for error in errors if not error.retryable), None)
        self._failed(claim, config, request, fatal or errors[0], outcomes, images=images, usage=usage)

    # -- upstreams that are themselves asynchronous -------------------------------------------
    def _run_polling(
        self,
        claim: Claim,
        config: ModelConfig,
        adapter: PollingAdapter,
        request: GenerationRequest,
        granted: Granted | None,
        inputs: Callable[[], EditInputs] | None = None,
    ) -> None:
        current_call.set(f"imagegate-{claim.task_id}-{claim.attempt}-0-{claim.polls}")
        try:
            if claim.upstream_task_id is None:  # the submit is the call the model's limits count
                try:
                    submit = (
                        functools.partial(adapter.submit_edit, request, inputs())
                        if inputs
                        else functools.partial(adapter.submit, request)
                    )
                    upstream_task_id = metered_call(claim.route, "submit", submit)
                finally:
                    self.admission.release(granted)
                self._wait_upstream(claim, upstream_task_id, config.poll_interval_s, poll=1)
                return
            generation = metered_call(claim.route, "poll", functools.partial(adapter.poll, claim.upstream_task_id))
            if generation is None:
                waited = (utcnow() - claim.started_at).total_seconds()
                if waited > config.poll_deadline_s:
                    raise UpstreamError(
                        ErrorCode.UPSTREAM_TIMEOUT,
                        f"the upstream task did not end within {config.poll_deadline_s:g} s",
                        False,
                    )
                countdown = min(
                    config.poll_interval_s * 1.5**claim.polls, MAX_POLL_INTERVAL_S, self.settings.retry_max_s
                )
                self._wait_upstream(claim, claim.upstream_task_id, countdown, poll=claim.polls + 1)
                return
            call = self._stored(0, generation, config)
        except UpstreamError as exc:
            call = Call(0, upstream_status=exc.upstream_status, error=exc)
        self._finish(claim, config, request, [call])

    def _wait_upstream(self, claim: Claim, upstream_task_id: str, countdown: float, poll: int) -> None:
        """Schedule poll step `poll`; the lease covers the wait, so a lost poll message is taken back."""
        if written := self.durable.write(
            claim, self.store.wait_upstream, claim, upstream_task_id, lease_s=countdown + self.settings.lease_s
        ):
            publish_run(
                self.celery, claim.task_id, claim.attempt, countdown=countdown, poll=poll, batch_id=claim.batch_id
            )
        else:
            self._stop_if_cancelled(claim, written)

    # -- ends ---------------------------------------------------------------------------------
    def _failed(
        self,
        claim: Claim,
        config: ModelConfig,
        request: GenerationRequest,
        exc: UpstreamError,
        outcomes: list[CallOutcome],
        *,
        images: list[NewImage],
        usage: dict | None,
    ) -> None:
        failure = self._failure(exc)
        if exc.retryable and claim.retries_used < min(request.retries, config.max_retries):
            delay = backoff_s(
                claim.retries_used + 1,
                base_s=self.settings.retry_base_s,
                max_s=self.settings.retry_max_s,
                retry_after_s=exc.retry_after_s,
            )
            self._retry(
                claim, failure, outcomes, images, usage, delay=delay, route=None, why=f"retrying in {delay:.1f} s"
            )
            return
        route = self._next_route(claim) if exc.retryable else None
        if route is None:
            self._end_failed(claim, failure, outcomes)
            return
        self._retry(claim, failure, outcomes, images, usage, delay=0.0, route=route, why=f"falling back to {route}")

    def _retry(
        self,
        claim: Claim,
        failure: Failure,
        outcomes: list[CallOutcome],
        images: list[NewImage],
        usage: dict | None,
        *,
        delay: float,
        route: str | None,
        why: str,
    ) -> None:
        images = self.durable.put(claim, images)
        if written := self.durable.write_pointing_at(
            claim,
            images,
            self.store.retry_later,
            claim,
            failure,
            outcomes,
            countdown_s=delay,
            images_=images,
            usage=usage,
            route=route,
        ):
            log.info("task %s attempt %s: %s; %s", claim.task_id, claim.attempt, failure.message, why)
            count_stored(claim, images)
            count_retry(claim, failure.code, route)
            publish_run(self.celery, claim.task_id, claim.attempt + 1, countdown=delay, batch_id=claim.batch_id)
        else:
            self._stop_if_cancelled(claim, written)

    def _next_route(self, claim: Claim) -> str | None:
        primary = self.models.get(claim.model)
        routes = [claim.model] + (primary.fallbacks if primary else [])
        position = routes.index(claim.route) if claim.route in routes else len(routes)
        return routes[position + 1] if position + 1 < len(routes) else None

    def _stop_if_cancelled(self, claim: Claim, refused: Refused) -> None:
        """A fenced write was refused: if because the client cancelled, end the task so."""
        if refused is Refused.CANCELLED and self.durable.write(claim, self.store.end_cancelled, claim):
            log.info("task %s attempt %s: cancelled", claim.task_id, claim.attempt)
            count_ended(claim, "failed", ErrorCode.CANCELLED)
            self._announce(claim)

    def _end_failed(self, claim: Claim, failure: Failure, outcomes: list[CallOutcome]) -> None:
        if self.durable.write(claim, self.store.fail, claim, failure, outcomes):
            log.info("task %s attempt %s: failed (%s: %s)", claim.task_id, claim.attempt, failure.code, failure.message)
            count_ended(claim, "failed", failure.code)
            self._announce(claim)

    def _announce(self, claim: Claim, reply: bytes | None = None) -> None:
        # The batch is closed through self.batches: one check at a time per batch, not one per task.
        self.after_end.task_ended(claim.task_id, None, has_callback=claim.callback_url is not None, reply=reply)
        if claim.batch_id is not None:
            self.batches.touched(claim.batch_id)

    def _failure(self, exc: UpstreamError) -> Failure:
        """What is stored (and served, sent in webhooks, logged) of an upstream error: every one
        passes here, so upstream text is redacted here."""
        return Failure(
            exc.code,
            self.redact.text(exc.message)[:MAX_MESSAGE_CHARS],
            self.redact.value(exc.details),
            exc.upstream_status,
        )
