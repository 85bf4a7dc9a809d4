"""The per-model limits kept in this process alone, for a worker with no Redis (the embedded mode,
whose one worker process makes them exact). The same rules as workers/model_gate.py's scripts, on
dictionaries under a lock and the monotonic clock."""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field

from imagegate.app.state.tasks import QueuedReason
from imagegate.workers.model_gate import BURST_S, WINDOW_S, Ask, Granted, NoRoom


@dataclass
class _Model:
    holders: dict[str, float] = field(default_factory=dict)  # member -> lease end
    calls: list[float] = field(default_factory=list)  # when each call of the window started, oldest first
    line: dict[str, tuple[int, int, float]] = field(default_factory=dict)  # task -> (place, need, lapses at)
    slow_rpm: int = 0
    throttled_at: float = -math.inf
    slow_until: float = 0.0
    paused_until: float = 0.0


class LocalModelGate:
    def __init__(self, window_s: float = WINDOW_S) -> None:
        self._window_s = window_s
        self._models: dict[str, _Model] = defaultdict(_Model)
        self._lock = threading.Lock()

    def _tidy(self, state: _Model, now: float) -> None:
        state.holders = {member: end for member, end in state.holders.items() if end > now}
        state.calls = [at for at in state.calls if at > now - self._window_s]
        state.line = {task: entry for task, entry in state.line.items() if entry[2] > now}
        if state.slow_until <= now:
            state.slow_rpm = 0

    def acquire_many(self, asks: list[Ask]) -> list[Granted | NoRoom]:
        return [self.acquire(ask) for ask in asks]

    def acquire(self, ask: Ask) -> Granted | NoRoom:
        with self._lock:
            now = time.monotonic()
            state = self._models[ask.model]
            self._tidy(state, now)
            max_conc = ask.max_concurrency or 0
            rate = ask.rpm or 0
            if state.slow_rpm and (not rate or state.slow_rpm < rate):
                rate = state.slow_rpm
            paused_s = state.paused_until - now

            def slots(need: int) -> int:
                return min(need, max_conc) if max_conc else 0

            no_room = None
            if max_conc or rate or paused_s > 0:
                lapses = state.line.get(ask.task, (0, 0, now + 1.0))[2]
                state.line[ask.task] = (ask.accepted_ms, ask.calls, lapses)
                order = sorted(state.line, key=lambda task: (state.line[task][0], task))
                position = order.index(ask.task)
                ahead = [state.line[task][1] for task in order[:position]]
                recent = len(state.calls)
                excess = recent + sum(ahead) + ask.calls - rate
                if paused_s > 0:
                    no_room = NoRoom(QueuedReason.MODEL_RATE_LIMIT, paused_s, position)
                elif max_conc and len(state.holders) + sum(map(slots, ahead)) + slots(ask.calls) > max_conc:
                    wait = ask.wait_s * (1 + min(position // max_conc, 9))
                    no_room = NoRoom(QueuedReason.MODEL_CONCURRENCY_LIMIT, wait, position)
                elif rate and excess > 0:
                    if excess <= recent:
                        wait = max(state.calls[excess - 1] + self._window_s - now, 0.001)
                    elif ask.calls > rate:
                        wait = max(state.slow_until - now, ask.wait_s)
                    else:
                        wait = self._window_s
                    no_room = NoRoom(QueuedReason.MODEL_RATE_LIMIT, wait, position)
            if no_room is not None:
                keep = no_room.wait_s + max(no_room.wait_s / 2, 2.0)
                state.line[ask.task] = (ask.accepted_ms, ask.calls, now + keep)
                return no_room
            state.line.pop(ask.task, None)
            prefix = f"{ask.task}:{uuid.uuid4().hex[:12]}:"
            holders = tuple(f"{prefix}h{index}" for index in range(1, slots(ask.calls) + 1))
            for member in holders:
                state.holders[member] = now + ask.lease_s
            state.calls.extend([now] * ask.calls)
            return Granted(ask.model, holders)

    def release(self, granted: Granted) -> None:
        with self._lock:
            for member in granted.holders:
                self._models[granted.model].holders.pop(member, None)

    def renew(self, model: str, holders: list[str], lease_s: float) -> None:
        with self._lock:
            state = self._models[model]
            until = time.monotonic() + lease_s
            for member in holders:
                if member in state.holders:
                    state.holders[member] = until

    def throttled(self, model: str, rpm: int | None, cooldown_s: float, retry_after_s: float | None) -> int:
        with self._lock:
            now = time.monotonic()
            state = self._models[model]
            self._tidy(state, now)
            if now - state.throttled_at < BURST_S:
                return state.slow_rpm
            state.throttled_at = now
            if rpm:
                state.slow_rpm = max(1, math.floor((state.slow_rpm or rpm) / 2))
                state.slow_until = now + cooldown_s
            if retry_after_s:
                state.paused_until = max(state.paused_until, now + retry_after_s)
            return state.slow_rpm
