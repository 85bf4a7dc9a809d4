"""Secrets never survive into a stored upstream error."""

from __future__ import annotations

import pytest

from imagegate.app.failures import ErrorCode
from imagegate.app.providers import ModelConfig
from imagegate.app.redaction import REDACTED, Redactor
from imagegate.workers.adapters import load_adapters
from imagegate.workers.adapters.base import UpstreamError
from imagegate.workers.runner import MAX_MESSAGE_CHARS, TaskRunner

KEY = "plain0upstream0key0without0prefix"


@pytest.mark.parametrize(
    "text",
    [
        f"invalid key {KEY} given",
        f"you sent Authorization: Bearer {KEY}",
        f'{{"headers": {{"authorization": "Basic {KEY}"}}}}',
        f"{{'Authorization': 'Bearer {KEY}'}}",
        f"x-api-key={KEY}&model=x",
        f"token is Bearer {KEY[:12]}",  # a fragment of the key, cut by the upstream
    ],
)
def test_the_key_and_credential_shapes_are_redacted(text):
    redacted = Redactor([KEY]).text(text)
    assert KEY[:12] not in redacted and REDACTED in redacted


@pytest.mark.parametrize(
    "text, kept",
    [
        ("Incorrect API key provided: sk-proj-AbCdEf0123456789xyz.", "Incorrect API key provided: "),
        ("key ig_Zx9-aaaaBBBBccccDDDD revoked", "revoked"),
        ("Authorization: Bearer abc.def-ghi; retry later", "; retry later"),
    ],
)
def test_unconfigured_keys_are_redacted_by_their_shape(text, kept):
    redacted = Redactor().text(text)
    assert "abc.def" not in redacted and "AbCdEf" not in redacted and "aaaaBBBB" not in redacted
    assert kept in redacted


def test_ordinary_error_text_is_left_alone():
    text = "Invalid size 999x999: must be one of 1024x1024, 1792x1024 (task-0123456789 total_tokens=5)"
    assert Redactor([KEY]).text(text) == text


def test_details_are_redacted_too():
    assert Redactor([KEY]).value({"upstream_code": f"bad {KEY}", "nested": [f"Bearer {KEY}"], "status": 401}) == {
        "upstream_code": f"bad {REDACTED}",
        "nested": [f"Bearer {REDACTED}"],
        "status": 401,
    }


def runner(models: dict[str, ModelConfig]) -> TaskRunner:
    """A runner for its pure parts only: nothing it would call is given."""
    return TaskRunner(
        settings=None,
        store=None,
        leases=None,
        successes=None,
        models=models,
        adapters=load_adapters(),
        http=None,
        after_end=None,
        celery=None,
    )


def test_the_runner_stores_upstream_errors_redacted_and_cut_after(monkeypatch):
    monkeypatch.setenv("UNIT_UPSTREAM_KEY", KEY)
    task_runner = runner(
        {"m": ModelConfig(name="m", adapter="openai", base_url="https://u.example", api_key_env="UNIT_UPSTREAM_KEY")}
    )
    # The key straddles the cut: redacting after cutting would leave a fragment of it.
    message = "x" * (MAX_MESSAGE_CHARS - 10) + f" {KEY} echo"
    failure = task_runner._failure(
        UpstreamError(ErrorCode.UPSTREAM_REJECTED, message, False, 400, details={"upstream_code": KEY})
    )
    assert KEY[:5] not in failure.message.replace("x", "") and len(failure.message) == MAX_MESSAGE_CHARS
    assert failure.details == {"upstream_code": REDACTED} and failure.code == ErrorCode.UPSTREAM_REJECTED


@pytest.mark.parametrize(
    "texts",
    [
        ["POST /v1/images/generations", f"key {KEY}"],
        ["ok", "AUTHORIZATION: Basic abc"],
        ["ok", "x ſignature=abc"],  # re's IGNORECASE folds U+017F to s: non-ASCII text keeps it
        ["https://h/i.png?SIGNATURE=abc"],
    ],
)
def test_a_line_is_clean_only_when_no_text_of_it_holds_anything_to_redact(texts):
    redactor = Redactor([KEY])
    assert not redactor.clean(texts)
    assert redactor.clean(["POST /v1/images/generations", "task accepted", "2702207e-1111"])
