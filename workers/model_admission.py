"""An attempt's claim under its model's upstream limits: the room for its calls is taken before the
claim is written (workers/model_limiter.py), so an attempt with no room is never claimed. It stays
pending, says why (`queued_reason`), and its message comes back after the wait: no retry is used,
no worker slot is held meanwhile, and its place in the model's line is kept."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from celery import Celery

from imagegate.app.failures import ErrorCode
from imagegate.app.providers import ModelConfig
from imagegate.app.queue import publish_run
from imagegate.app.state.refused import Refused
from imagegate.app.stores.attempts import AttemptStore, Claim, PlanCalls, Wait, Waiting
from imagegate.workers.adapters import Upstream
from imagegate.workers.adapters.base import UpstreamError
from imagegate.workers.grouped_claims import GroupedClaims
from imagegate.workers.model_gate import Granted
from imagegate.workers.model_limiter import LimitsUnavailable, ModelLimiter, over_rate

log = logging.getLogger(__name__)


@dataclass
class _Room:
    """One claim's ask for room (an `AdmitsTogether`), and the room it was given."""

    admission: ModelAdmission
    granted: Granted | None = None

    def __call__(self, claim: Claim, slots: list[int]) -> Wait | None:
        (answer,) = self.together([(self, claim, slots)])
        if isinstance(answer, Exception):
            raise answer
        return answer

    @property
    def together(self) -> Callable[[list[tuple[_Room, Claim, list[int]]]], list[Wait | Exception | None]]:
        return self.admission.admit_together


@dataclass
class ModelAdmission:
    upstreams: dict[str, Upstream]
    celery: Celery
    limiter: ModelLimiter | None = None  # None: no limits are kept

    def claim(
        self,
        store: AttemptStore | GroupedClaims,
        task_id: uuid.UUID,
        attempt: int,
        *,
        worker: str,
        lease_s: float,
        plan: PlanCalls,
    ) -> tuple[Claim | Refused | None, Granted | None]:
        """The claim and the room its calls hold (until `release`); None for an attempt now waiting
        for room (its message is published again) or not claimed because the limits are unavailable
        (still pending: the sweeper publishes it again)."""
        if self.limiter is None:
            return store.claim(task_id, attempt, worker=worker, lease_s=lease_s, plan=plan), None
        room = _Room(self)
        try:
            claim = store.claim(task_id, attempt, worker=worker, lease_s=lease_s, plan=plan, admit=room)
        except LimitsUnavailable as exc:
            log.warning("task %s attempt %s: model limits unavailable (%s); not claimed", task_id, attempt, exc)
            return None, None
        except BaseException:
            self.release(room.granted)
            raise
        if isinstance(claim, Waiting):
            log.info("task %s attempt %s: waiting %.1f s (%s)", task_id, attempt, claim.countdown_s, claim.reason)
            publish_run(self.celery, task_id, attempt, countdown=claim.countdown_s, batch_id=claim.batch_id)
            return None, None
        if not claim:
            self.release(room.granted)
        return claim, room.granted

    def admit_together(self, asked: list[tuple[_Room, Claim, list[int]]]) -> list[Wait | Exception | None]:
        """Room for each claim's calls, the gate asked once for all that need it; each room given is
        kept on its `_Room` (None in the answers), each wait answered."""
        answers: list[Wait | Exception | None] = [None] * len(asked)
        gated = [
            (position, config)
            for position, (_, claim, slots) in enumerate(asked)
            if (config := self._gated(claim, slots))
        ]
        if not gated or self.limiter is None:
            return answers
        try:
            given = self.limiter.admit_many(
                [(config, asked[position][1], len(asked[position][2])) for position, config in gated]
            )
        except LimitsUnavailable as exc:
            given = [LimitsUnavailable(str(exc)) for _ in gated]  # one each: each is raised in its own claim
        for (position, _), answer in zip(gated, given, strict=True):
            if isinstance(answer, Granted):
                asked[position][0].granted = answer
            else:
                answers[position] = answer
        return answers

    def _gated(self, claim: Claim, slots: list[int]) -> ModelConfig | None:
        """The model whose gate the claim's calls must pass, if they must."""
        upstream = self.upstreams.get(claim.route)
        if self.limiter is None or upstream is None or upstream.unavailable:
            return None  # no call will be made: the attempt fails
        if upstream.polling and claim.upstream_task_id:
            return None  # only polling what the upstream was already given: not a new call
        if over_rate(upstream.config, len(slots)):
            return None  # it can never start: `refusal` fails it
        return upstream.config

    def refusal(self, config: ModelConfig, calls: int) -> UpstreamError | None:
        """Why an attempt of `calls` calls fails at once: more than the model's rpm."""
        too_many = over_rate(config, calls) if self.limiter is not None else None
        return UpstreamError(ErrorCode.MISCONFIGURED, too_many, False) if too_many else None

    def release(self, granted: Granted | None) -> None:
        if self.limiter is not None:
            self.limiter.release(granted)

    def answered(self, config: ModelConfig, exc: UpstreamError) -> None:
        """An upstream call failed: a 429 lowers the model's rate for every worker."""
        if self.limiter is not None and exc.upstream_status == 429:
            self.limiter.throttled(config, exc.retry_after_s)
