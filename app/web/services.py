"""What the web process is wired to: the runtime every process has, plus what only the API needs."""

from __future__ import annotations

from dataclasses import dataclass, fields

from flask import current_app

from imagegate.app.keys import KeyCache
from imagegate.app.providers import ModelConfig
from imagegate.app.queue import RunPublisher
from imagegate.app.runtime import Runtime
from imagegate.app.web.async_submits import AsyncSubmits


@dataclass(frozen=True, kw_only=True)
class Services(Runtime):
    models: dict[str, ModelConfig]
    keys: KeyCache
    runs: RunPublisher  # first attempts of async and sync submits
    async_submits: AsyncSubmits  # plain async submits, stored and published in groups

    @classmethod
    def of(cls, runtime: Runtime, *, models: dict[str, ModelConfig], keys: KeyCache) -> Services:
        runs = RunPublisher(runtime.celery)
        return cls(
            **{field.name: getattr(runtime, field.name) for field in fields(Runtime)},
            models=models,
            keys=keys,
            runs=runs,
            async_submits=AsyncSubmits(runtime.tasks, runs),
        )

    @property
    def default_model(self) -> str:
        return next(iter(self.models))


def services() -> Services:
    return current_app.extensions["imagegate"]
