"""`imagegate keys` as an operator uses it, and the CLI's answer to ordinary mistakes: one line and a
non-zero exit, never a traceback, never a key's hash or webhook secret."""

from __future__ import annotations

import re
import uuid

import httpx
import pytest

from tests.support.databases import drop_database, fresh_database
from tests.support.processes import create_key, run_cli
from tests.support.services import free_port

HEADER = ["name", "prefix", "created", "last used", "revoked", "rpm", "images/day", "max pending"]


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def listed(env: dict[str, str]) -> dict[str, list[str]]:
    """`keys list` piped (not a terminal): a header, then tab-separated rows, by name."""
    result = run_cli(["keys", "list"], env)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.strip().splitlines()
    assert header.split("\t") == HEADER
    return {row.split("\t")[0]: row.split("\t") for row in rows}


def assert_one_clear_line(result, *words: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    output = result.stdout + result.stderr
    assert "whsec_" not in output and "ig_" not in output and not re.search(r"[0-9a-f]{64}", output)
    for word in words:
        assert word in result.stderr


def test_keys_list_shows_use_and_revoke_takes_effect(env, api_url):
    used, unused = unique("used"), unique("unused")
    used_key, unused_key = create_key(env, used), create_key(env, unused)
    task = f"{api_url}/v1/images/{uuid.uuid4()}"
    assert httpx.get(task, headers={"Authorization": f"Bearer {used_key}"}).status_code == 404  # authenticated

    rows = listed(env)
    assert rows[used][1] == used_key[:10] and rows[used][3] != "-" and rows[used][4] == "-"
    assert rows[unused][3] == "-"
    assert used_key not in str(rows) and unused_key not in str(rows)

    result = run_cli(["keys", "revoke", unused], env)
    assert result.returncode == 0, result.stderr
    assert listed(env)[unused][4] != "-"
    reply = httpx.get(task, headers={"Authorization": f"Bearer {unused_key}"})
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
    assert_one_clear_line(run_cli(["keys", "revoke", unused], env), "no live key named")


def test_a_live_key_name_is_unique_and_free_again_once_revoked(env, migrated):
    name = unique("dup")
    create_key(env, name)
    assert_one_clear_line(run_cli(["keys", "create", "--name", name], env), "already named", "--name")
    assert run_cli(["keys", "revoke", name], env).returncode == 0
    create_key(env, name)


def test_keys_create_before_db_upgrade(env, postgres_url):
    url = fresh_database(postgres_url)
    try:
        result = run_cli(["keys", "create", "--name", "early"], env | {"IMAGEGATE_DATABASE_URL": url})
    finally:
        drop_database(url)
    assert_one_clear_line(result, "imagegate db upgrade")


def test_keys_create_on_a_database_that_does_not_exist(env, postgres_url):
    url = f"{postgres_url}/imagegate_missing_{uuid.uuid4().hex[:8]}"
    result = run_cli(["keys", "create", "--name", "nowhere"], env | {"IMAGEGATE_DATABASE_URL": url})
    assert_one_clear_line(result, "does not exist", "IMAGEGATE_DATABASE_URL")


@pytest.mark.parametrize("command", [["keys", "list"], ["db", "upgrade"]])
def test_a_database_that_does_not_answer(env, command):
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/imagegate"
    assert_one_clear_line(run_cli(command, env | {"IMAGEGATE_DATABASE_URL": url}), "IMAGEGATE_DATABASE_URL")


def test_a_broker_that_does_not_answer(env, migrated):
    broker = f"redis://127.0.0.1:{free_port()}/0"
    result = run_cli(["sweeper", "--once"], env | {"IMAGEGATE_BROKER_URL": broker})
    assert_one_clear_line(result, "broker", "IMAGEGATE_BROKER_URL")
    # Keys live in the database alone: making one needs no broker.
    result = run_cli(["keys", "create", "--name", unique("no-broker")], env | {"IMAGEGATE_BROKER_URL": broker})
    assert result.returncode == 0, result.stderr


def test_limits_set_at_creation_changed_by_update_and_shown_by_list(env, migrated):
    name = unique("limited")
    limits = ["--rpm", "60", "--images-per-day", "500", "--max-pending", "0"]
    result = run_cli(["keys", "create", "--name", name, *limits], env)
    assert result.returncode == 0, result.stderr
    assert listed(env)[name][5:] == ["60", "500", "unlimited"]

    # Only the flags given change; `default` follows the IMAGEGATE_DEFAULT_* setting again.
    result = run_cli(["keys", "update", "--name", name, "--rpm", "default", "--max-pending", "4"], env)
    assert result.returncode == 0 and name in result.stdout, result.stderr
    assert listed(env)[name][5:] == ["default (unlimited)", "500", "4"]
    assert listed(env | {"IMAGEGATE_DEFAULT_RPM": "30"})[name][5] == "default (30)"

    plain = unique("plain")
    create_key(env, plain)
    assert listed(env | {"IMAGEGATE_DEFAULT_MAX_PENDING": "8"})[plain][5:] == [
        "default (unlimited)",
        "default (unlimited)",
        "default (8)",
    ]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["create", "--name", "bad-limit", "--rpm", "-1"], ["--rpm", "-1"]),
        (["create", "--name", "bad-limit", "--images-per-day", "lots"], ["--images-per-day", "lots"]),
        (["update", "--name", "anyone", "--max-pending", "1.5"], ["--max-pending"]),
        (["update", "--name", "anyone"], ["nothing to update"]),
        (["update", "--name", "nobody-has-this-name", "--rpm", "5"], ["no live key named"]),
    ],
)
def test_bad_limits_and_unknown_keys_are_one_clear_line(env, migrated, args, words):
    result = run_cli(["keys", *args], env)
    assert_one_clear_line(result, *words)
    assert "bad-limit" not in listed(env)
