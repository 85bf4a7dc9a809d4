"""Fixtures of the state machine tests: an engine on this run's migrated database and an API key of
each module's own."""

from __future__ import annotations

import uuid

import pytest

from imagegate.app.db import make_engine
from tests.state.rows import new_key


@pytest.fixture(scope="module")
def engine(database_url, migrated):
    engine = make_engine(database_url, pool_size=4, pre_ping=False)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def key_id(engine) -> uuid.UUID:
    return new_key(engine)
