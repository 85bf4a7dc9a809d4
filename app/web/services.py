"""What the web process is wired to, built once per app by create_app."""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from flask import current_app
from sqlalchemy.orm import Session, sessionmaker

from app.endings import Endings
from app.events import TaskEvents
from app.keys import KeyCache
from app.providers import ModelConfig
from app.settings import Settings
from app.store import TaskStore


@dataclass(frozen=True)
class Services:
    settings: Settings
    models: dict[str, ModelConfig]
    sessions: sessionmaker[Session]
    keys: KeyCache
    store: TaskStore
    celery: Celery
    events: TaskEvents
    endings: Endings

    @property
    def default_model(self) -> str:
        return next(iter(self.models))


def services() -> Services:
    return current_app.extensions["imagegate"]
