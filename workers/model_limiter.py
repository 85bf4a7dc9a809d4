"""The worker's side of the per-model upstream limits (`max_concurrency`, `rpm` in the providers
file): ask the gate for room before an attempt's calls, keep the slots' leases renewed while the
calls run, give them back after, and tell the gate of every 429.

With Redis (IMAGEGATE_MODEL_LIMITS_URL, or the broker when it is Redis) every worker process on every
host shares one gate (workers/model_gate.py); without, each process keeps its own
(workers/model_gate_local.py): exact for the embedded mode's single worker.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import defaultdict
from typing import Protocol

import redis

from imagegate.app.providers import ModelConfig
from imagegate.app.settings import Settings
from imagegate.app.stores.attempts import Claim, Wait
from imagegate.workers.model_gate import Ask, Granted, NoRoom, RedisModelGate
from imagegate.workers.model_gate_local import LocalModelGate

log = logging.getLogger(__name__)

MIN_WAIT_S = 0.05
MAX_JITTER_S = 0.5


class ModelGate(Protocol):
    def acquire(self, ask: Ask) -> Granted | NoRoom: ...
    def acquire_many(self, asks: list[Ask]) -> list[Granted | NoRoom]: ...
    def release(self, granted: Granted) -> None: ...
    def renew(self, model: str, holders: list[str], lease_s: float) -> None: ...
    def throttled(self, model: str, rpm: int | None, cooldown_s: float, retry_after_s: float | None) -> int: ...


class LimitsUnavailable(Exception):
    """The shared gate cannot be asked (Redis is away): no call is made without it."""


def over_rate(config: ModelConfig, calls: int) -> str | None:
    """Why an attempt of `calls` calls can never start on this model, if it cannot."""
    if config.rpm is not None and calls > config.rpm:
        return (
            f"this request needs {calls} upstream calls at once, more than model {config.name!r} "
            f"allows in a minute (rpm = {config.rpm})"
        )
    return None


class ModelLimiter:
    def __init__(self, gate: ModelGate, *, lease_s: float, wait_s: float, cooldown_s: float) -> None:
        self.gate = gate
        self._lease_s, self._wait_s, self._cooldown_s = lease_s, wait_s, cooldown_s
        self._held: set[Granted] = set()
        self._lock = threading.Lock()
        self._renewer: threading.Thread | None = None

    def admit_many(self, asked: list[tuple[ModelConfig, Claim, int]]) -> list[Granted | Wait]:
        """For each (model, claim, calls): room for the calls now (held until `release`), or how long
        to wait; the gate is asked once for all of them."""
        asks = [
            Ask(
                model=config.name,
                task=str(claim.task_id),
                calls=calls,
                max_concurrency=config.max_concurrency,
                rpm=config.rpm,
                accepted_ms=round((claim.created_at or claim.started_at).timestamp() * 1000),
                lease_s=self._lease_s,
                wait_s=self._wait_s,
            )
            for config, claim, calls in asked
        ]
        try:
            answers = self.gate.acquire_many(asks)
        except redis.RedisError as exc:
            raise LimitsUnavailable(str(exc)) from exc
        return [self._kept(answer) for answer in answers]

    def _kept(self, answer: Granted | NoRoom) -> Granted | Wait:
        if isinstance(answer, NoRoom):
            # A little jitter, so the tasks told to wait alike do not all ask again at one instant;
            # little enough that a task told when room comes is not late for it.
            jitter = random.uniform(0, min(answer.wait_s * 0.2, MAX_JITTER_S))
            return Wait(answer.reason, max(MIN_WAIT_S, answer.wait_s + jitter))
        if answer.holders:
            with self._lock:
                self._held.add(answer)
                self._start_renewing()
        return answer

    def release(self, granted: Granted | None) -> None:
        """Give the slots back (a second release of the same grant does nothing)."""
        if granted is None or not granted.holders:
            return
        with self._lock:
            if granted not in self._held:
                return
            self._held.discard(granted)
        try:
            self.gate.release(granted)
        except redis.RedisError as exc:  # the slots' leases end by themselves
            log.warning("could not give back %d slots of model %r: %s", granted.slots, granted.model, exc)

    def throttled(self, config: ModelConfig, retry_after_s: float | None) -> None:
        """The upstream answered 429: halve the model's rpm for everyone (if it has one) for a while,
        and pause it for Retry-After."""
        try:
            rate = self.gate.throttled(config.name, config.rpm, self._cooldown_s, retry_after_s)
        except redis.RedisError as exc:
            log.warning("could not record a 429 of model %r: %s", config.name, exc)
            return
        lowered = f"{rate} calls a minute for {self._cooldown_s:g} s" if rate else ""
        paused = f"none for {retry_after_s:g} s" if retry_after_s else ""
        if lowered or paused:
            log.info("model %r answered 429: %s", config.name, ", ".join(filter(None, (paused, lowered))))

    def _start_renewing(self) -> None:
        if self._renewer is None or not self._renewer.is_alive():
            self._renewer = threading.Thread(target=self._renew_forever, name="model-slots", daemon=True)
            self._renewer.start()

    def _renew_forever(self) -> None:
        # The slots' leases are as long as an attempt's and renewed as often (workers/leases.py):
        # a long call keeps its slot, a dead worker's slots come back within a lease.
        while True:
            time.sleep(self._lease_s / 3)
            with self._lock:
                by_model: dict[str, list[str]] = defaultdict(list)
                for granted in self._held:
                    by_model[granted.model].extend(granted.holders)
            for model, holders in by_model.items():
                try:
                    self.gate.renew(model, holders, self._lease_s)
                except redis.RedisError as exc:
                    log.warning("could not renew %d slots of model %r: %s", len(holders), model, exc)


def make_limiter(settings: Settings) -> ModelLimiter:
    url = settings.shared_limits_url
    gate: ModelGate = (
        RedisModelGate(redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3))
        if url
        else LocalModelGate()
    )
    return ModelLimiter(
        gate, lease_s=settings.lease_s, wait_s=settings.model_wait_s, cooldown_s=settings.model_cooldown_s
    )
