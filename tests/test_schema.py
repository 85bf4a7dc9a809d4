"""Migrations agree with the models, on Postgres and SQLite; /openapi.json is a valid 3.1 document
generated from the validating models."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from openapi_spec_validator import validate
from sqlalchemy import create_engine

from app.migrate import alembic_config, upgrade
from app.models import Base
from app.schemas import GenerationRequest
from app.web.openapi import openapi_document


def diff(database_url: str) -> list:
    engine = create_engine(database_url)
    with engine.connect() as connection:
        return compare_metadata(MigrationContext.configure(connection), Base.metadata)


def test_one_alembic_head():
    assert len(ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads()) == 1


def test_migrations_match_the_models_on_postgres(database_url, migrated):
    assert diff(database_url) == []


def test_migrations_run_on_sqlite_and_match_the_models(tmp_path):
    url = f"sqlite:///{tmp_path / 'embedded.db'}"
    upgrade(url)
    assert diff(url) == []


def test_openapi_is_valid_and_built_from_the_request_model(app_client):
    document = app_client.get("/openapi.json").get_json()
    validate(document)
    assert document["openapi"].startswith("3.1")
    schema = document["components"]["schemas"]["GenerationRequest"]
    assert set(schema["properties"]) == {field.alias or name for name, field in GenerationRequest.model_fields.items()}
    assert schema["required"] == ["prompt"]
    assert document == openapi_document()
