"""Databases of a test's own on a given Postgres server, beside the session's."""

from __future__ import annotations

import uuid

import psycopg


def fresh_database(server_url: str) -> str:
    name = f"imagegate_fault_{uuid.uuid4().hex[:10]}"
    admin = server_url.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return f"{server_url}/{name}"


def drop_database(database_url: str) -> None:
    server, name = database_url.rsplit("/", 1)
    admin = server.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except psycopg.OperationalError:
        pass  # a throwaway server already gone takes its databases with it
