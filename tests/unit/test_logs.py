"""One log format for every process: JSON lines with the bound context, and no secret in any line."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor

import pytest
import structlog

from imagegate.app.logs import bound_contextvars, clear_contextvars, configure_logging, in_this_context
from imagegate.app.redaction import REDACTED, Redactor
from imagegate.app.settings import Settings
from imagegate.app.web.request_ids import MAX_LENGTH, request_id_of

API_KEY = "ig_" + "k" * 43
UPSTREAM_KEY = "plainUpstreamKeyWithoutAnyPrefix0123"
WEBHOOK_SECRET = "whsec_c2VjcmV0LXNpZ25pbmcta2V5LWJ5dGVz"
SIGNATURE = "Zm9vYmFyYmF6cXV4c2lnbmF0dXJl"


@pytest.fixture(autouse=True)
def fresh_context():
    clear_contextvars()  # what in-process requests of other tests left bound in this thread


@pytest.fixture
def restore_logging():
    """configure_logging replaces the root logger's handlers: give pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level
    logging.captureWarnings(False)
    structlog.reset_defaults()


def _settings(tmp_path, **overrides) -> Settings:
    providers = tmp_path / "providers.toml"
    providers.write_text('[models."up"]\nadapter = "openai"\nbase_url = "https://up.example"\napi_key_env = "UP_KEY"\n')
    return Settings(providers_file=providers, secret_key="a-long-url-signing-secret-key", **overrides)


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_lines_carry_the_context_and_no_secret(tmp_path, capsys, monkeypatch, restore_logging):
    monkeypatch.setenv("UP_KEY", UPSTREAM_KEY)
    assert configure_logging(_settings(tmp_path), "worker") is True  # stderr is not a terminal here
    log = logging.getLogger("imagegate.test")
    with bound_contextvars(task_id="t-1", attempt=2, model="up", api_key_id="k-1"):
        log.info(
            "upstream said %s; sent Authorization: Bearer %s with %s, got /files/images/x.png?expires=9&signature=%s",
            UPSTREAM_KEY,
            API_KEY,
            WEBHOOK_SECRET,
            SIGNATURE,
        )
        try:
            raise RuntimeError(f"boom {UPSTREAM_KEY}")
        except RuntimeError:
            log.exception("failed")
    structlog.get_logger("imagegate.native").warning("native", secret=WEBHOOK_SECRET, nested={"key": API_KEY})
    log.info("after the run")

    output = capsys.readouterr().err
    for secret in (API_KEY, UPSTREAM_KEY, WEBHOOK_SECRET, SIGNATURE, "a-long-url-signing-secret-key"):
        assert secret not in output
    first, failed, native, after = _lines(output)
    assert {"timestamp", "level", "logger", "event", "process"} <= first.keys()
    assert (first["level"], first["logger"], first["process"]) == ("info", "imagegate.test", "worker")
    assert (first["task_id"], first["attempt"], first["model"], first["api_key_id"]) == ("t-1", 2, "up", "k-1")
    assert "signature=" + REDACTED in first["event"] and first["event"].count(REDACTED) == 4
    assert failed["level"] == "error" and "RuntimeError: boom " + REDACTED in failed["exception"]
    assert native["secret"] == REDACTED and native["nested"] == {"key": REDACTED}
    assert "task_id" not in after  # the context ended with the block


def test_text_for_a_person(tmp_path, capsys, restore_logging):
    assert configure_logging(_settings(tmp_path, log_format="text"), "api") is False
    with bound_contextvars(request_id="r-1"):
        logging.getLogger("imagegate.test").warning("key %s", API_KEY)
    line = capsys.readouterr().err.strip()
    assert "warning" in line and "key " + REDACTED in line and "request_id=r-1" in line and "process=api" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_the_level_applies(tmp_path, capsys, restore_logging):
    configure_logging(_settings(tmp_path, log_level="warning"), "sweeper")
    logging.getLogger("imagegate.test").info("hidden")
    logging.getLogger("imagegate.test").warning("shown")
    assert [line["event"] for line in _lines(capsys.readouterr().err)] == ["shown"]


def test_a_pool_thread_keeps_the_callers_context():
    with bound_contextvars(task_id="t-9"):
        with ThreadPoolExecutor(2) as pool:
            seen = list(pool.map(in_this_context(lambda _: structlog.contextvars.get_contextvars()), [0, 1]))
    assert seen == [{"task_id": "t-9"}] * 2


@pytest.mark.parametrize(
    "text",
    [
        f"secret {WEBHOOK_SECRET}",
        f"GET /files/images/a.png?expires=1&signature={SIGNATURE} HTTP/1.1",
        f'{{"url": "https://cdn.example/x.png?X-Amz-Signature={SIGNATURE}&b=1"}}',
    ],
)
def test_webhook_secrets_and_url_signatures_are_redacted(text):
    redacted = Redactor().text(text)
    assert WEBHOOK_SECRET not in redacted and SIGNATURE not in redacted and REDACTED in redacted


@pytest.mark.parametrize("presented", ["abc-123", "a" * MAX_LENGTH, "trace id/with spaces:1"])
def test_a_sane_request_id_is_kept(presented):
    assert request_id_of(presented) == presented


@pytest.mark.parametrize("presented", [None, "", "a" * (MAX_LENGTH + 1), "bad\x00id", "tab\tid", "é"])
def test_any_other_request_id_is_replaced(presented):
    made = request_id_of(presented)
    assert made != presented and len(made) == 32 and made.isalnum()
