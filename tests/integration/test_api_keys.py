"""API key names and last use: migration 0004 keeps every key working while making live names
unique, and an API process records a key's last use at most once a minute."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError

from imagegate.app.db import make_engine, make_sessionmaker
from imagegate.app.keys import KeyCache, KeyNameTaken, create_key, revoke_key
from imagegate.app.migrate import upgrade
from tests.support.databases import drop_database, fresh_database

INSERT = text(
    "INSERT INTO api_keys (id, name, prefix, key_hash, created_at, revoked_at) "
    "VALUES (:id, :name, 'ig_x', :hash, :created, :revoked)"
)


@pytest.fixture
def database_at_0003(postgres_url):
    url = fresh_database(postgres_url)
    upgrade(url, "0003")
    yield url
    drop_database(url)


def test_migration_renames_later_live_duplicates_and_keeps_them_working(database_at_0003):
    engine = create_engine(database_at_0003)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    keys = [  # (name, revoked): the oldest live "ci" keeps its name; "ci-2" is taken already
        ("ci", False),
        ("ci", True),
        ("ci", False),
        ("ci-2", False),
        ("ci", False),
    ]
    ids = [uuid.uuid4() for _ in keys]
    with engine.begin() as connection:
        for index, ((name, revoked), key_id) in enumerate(zip(keys, ids, strict=True)):
            created = start + timedelta(minutes=index)
            values = {"id": key_id, "name": name, "hash": uuid.uuid4().hex, "created": created}
            connection.execute(INSERT, values | {"revoked": created if revoked else None})
    upgrade(database_at_0003)
    with engine.connect() as connection:
        names = dict(connection.execute(text("SELECT id, name FROM api_keys")).all())
    assert [names[key_id] for key_id in ids] == ["ci", "ci", "ci-3", "ci-2", "ci-4"]
    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(INSERT, {"id": uuid.uuid4(), "name": "ci", "hash": "h", "created": start, "revoked": None})
    engine.dispose()


def test_a_name_is_unique_among_live_keys(database_url, migrated):
    engine = make_engine(database_url, pool_size=1)
    sessions = make_sessionmaker(engine)
    name = f"unique-{uuid.uuid4().hex[:8]}"
    create_key(sessions, name)
    with pytest.raises(KeyNameTaken):
        create_key(sessions, name)
    assert revoke_key(sessions, name) and not revoke_key(sessions, name)
    create_key(sessions, name)
    engine.dispose()


def test_last_use_is_written_at_most_once_a_minute(database_url, migrated):
    engine = make_engine(database_url, pool_size=1)
    sessions = make_sessionmaker(engine)
    name = f"used-{uuid.uuid4().hex[:8]}"
    key = create_key(sessions, name).key

    def last_used():
        with engine.connect() as connection:
            return connection.execute(text("SELECT last_used_at FROM api_keys WHERE name = :n"), {"n": name}).scalar()

    def forget():
        with engine.begin() as connection:
            connection.execute(text("UPDATE api_keys SET last_used_at = NULL WHERE name = :n"), {"n": name})

    assert last_used() is None
    cache = KeyCache(sessions, ttl_s=15)
    assert cache.authenticate(key) is not None
    assert last_used() is not None
    forget()
    for _ in range(3):  # within the minute this process writes nothing more
        assert cache.authenticate(key) is not None
    assert last_used() is None
    assert KeyCache(sessions, ttl_s=0).authenticate(key) is not None  # another process writes its own
    assert last_used() is not None
    forget()
    uncached = KeyCache(sessions, ttl_s=0, last_used_every_s=0)
    uncached.authenticate(key)
    assert last_used() is not None
    engine.dispose()
