"""Migrations agree with the models, on Postgres and SQLite; /openapi.json is a valid 3.1 document
assembled from the routes and the validating models, shown at /docs."""

from __future__ import annotations

import re

import schemathesis
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from openapi_spec_validator import validate
from schemathesis.specs.openapi.checks import positive_data_acceptance
from sqlalchemy import create_engine

from imagegate.app.migrate import alembic_config, upgrade
from imagegate.app.models import Base
from imagegate.app.schemas import BatchCreate, BatchLine, GenerationRequest
from imagegate.app.web import create_app
from imagegate.app.web.openapi import openapi_document


def diff(database_url: str) -> list:
    engine = create_engine(database_url)
    with engine.connect() as connection:
        return compare_metadata(MigrationContext.configure(connection), Base.metadata)


def test_one_alembic_head():
    assert len(ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads()) == 1


def test_migrations_match_the_models_on_postgres(database_url, migrated):
    assert diff(database_url) == []


def test_image_bytes_are_stored_without_postgres_compression(database_url, migrated):
    # Images come compressed (PNG, JPEG, WebP): pglz's attempt on each cost ~2 ms of Postgres CPU.
    engine = create_engine(database_url)
    with engine.connect() as connection:
        storage = dict(
            connection.exec_driver_sql(
                "SELECT attrelid::regclass::text, attstorage FROM pg_attribute"
                " WHERE attname = 'data' AND attrelid IN ('images'::regclass, 'task_inputs'::regclass)"
            ).all()
        )
    assert storage == {"images": "e", "task_inputs": "e"}


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
    assert document == openapi_document(app_client.application)


def test_every_route_but_the_documents_own_is_in_the_document(app_client):
    app = app_client.application
    document = app_client.get("/openapi.json").get_json()
    documented = {(path, method) for path, methods in document["paths"].items() for method in methods}
    undocumented = {
        "static",
        "healthz",
        "readyz",
        "metrics.metrics_page",
        "openapi.openapi_json",
        "openapi.swagger_ui.show",
    }
    for rule in app.url_map.iter_rules():
        if rule.endpoint in undocumented or rule.endpoint.startswith("dashboard."):  # pages, not the API
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule.rstrip("/"))
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert (path, method.lower()) in documented, (rule.rule, method)
    operation_ids = [
        operation["operationId"] for methods in document["paths"].values() for operation in methods.values()
    ]
    assert len(operation_ids) == len(set(operation_ids)) == len(documented)


def test_batch_bodies_are_documented_by_the_models_that_validate_them(app_client):
    document = app_client.get("/openapi.json").get_json()
    content = document["paths"]["/v1/images/batches"]["post"]["requestBody"]["content"]
    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/BatchCreate"}
    assert "application/jsonl" in content
    schemas = document["components"]["schemas"]
    assert set(schemas["BatchCreate"]["properties"]) == set(BatchCreate.model_fields)
    assert set(schemas["BatchLine"]["properties"]) == set(BatchLine.model_fields)
    assert schemas["BatchCreate"]["properties"]["requests"]["items"] == {"$ref": "#/components/schemas/BatchLine"}


def test_the_docs_page_and_its_files_are_served_from_here(app_client):
    page = app_client.get("/docs", follow_redirects=True)
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "/openapi.json" in html and "https://" not in html  # works offline: nothing from a CDN
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert f"/docs/{asset}" in html
        assert app_client.get(f"/docs/{asset}").status_code == 200


def test_the_api_answers_as_its_document_says(settings, redis_dbs, migrated, api_key):
    """Schemathesis' checks, on every documented operation, in this process. All but one: a request
    the schema allows may still be refused for what no schema says (a callback URL to a private
    address, an unknown model, what a model's family cannot do). A synchronous request waits out a
    short timeout: it publishes to the Redis db no worker consumes."""
    app = create_app(settings.model_copy(update={"broker_url": redis_dbs[1], "sync_timeout_s": 0.2}))
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    headers = {"Authorization": f"Bearer {api_key}"}
    for found in schema.get_all_operations():
        operation = found.ok()

        @given(operation.as_strategy())
        @hypothesis_settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
        def answers_as_documented(case):
            case.call_and_validate(headers=headers, excluded_checks=[positive_data_acceptance])

        answers_as_documented()
