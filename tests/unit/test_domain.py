"""Unit tier: settings, providers file, backoff, URL signing, Celery delivery settings."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from imagegate.app.image_urls import signed_image_url, verify
from imagegate.app.providers import ProvidersFileError, installed_adapters, load_models
from imagegate.app.queue import celery_config
from imagegate.app.settings import Settings, SettingsError
from imagegate.workers.retry import backoff_s

ADAPTERS = {"local", "openai"}


def test_default_secret_is_refused_outside_the_embedded_mode():
    with pytest.raises(SettingsError, match="IMAGEGATE_SECRET_KEY"):
        Settings(secret_key="change-me").check()
    assert Settings(secret_key="change-me", embedded=True).check()


def test_settings_read_the_environment(monkeypatch):
    monkeypatch.setenv("IMAGEGATE_SYNC_TIMEOUT_S", "12.5")
    monkeypatch.setenv("IMAGEGATE_MAX_BODY_BYTES", "1000")
    settings = Settings()
    assert settings.sync_timeout_s == 12.5 and settings.max_body_bytes == 1000
    assert Settings(_env_file=None).broker_url.startswith("redis://")


def test_without_a_providers_file_the_local_model_is_served():
    assert list(load_models(None)) == ["local"]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "providers.toml"
    path.write_text(text)
    return path


def test_a_providers_file_is_read(tmp_path):
    path = write(
        tmp_path,
        '[models."dall-e-3"]\nadapter = "openai"\nbase_url = "https://x/v1"\n'
        'api_key_env = "OPENAI_API_KEY"\ntimeout_s = 120\nmax_retries = 2\n',
    )
    model = load_models(path, ADAPTERS)["dall-e-3"]
    assert (model.adapter, model.upstream_name, model.timeout_s, model.max_retries) == ("openai", "dall-e-3", 120, 2)


@pytest.mark.parametrize(
    "text,expected",
    [
        ('[models."m1"]\nadapter = "nope"\nbase_url = "https://x"\n', ["m1", "'adapter'", "nope"]),
        ('[models."m2"]\nadapter = "openai"\nbase_url = "https://x"\ntimeout_s = "slow"\n', ["m2", "'timeout_s'"]),
        ('[models."m3"]\nadapter = "openai"\nbase_url = "https://x"\napi_key = "sk-1"\n', ["m3", "'api_key'"]),
        ('[models."m4"]\nadapter = "openai"\n', ["m4", "'base_url'"]),
        ('[models."m5"\nadapter = "openai"\n', ["not valid TOML"]),
        ('title = "x"\n', ["'title'"]),
        ('[models."m6"]\nadapter = "openai"\nbase_url = "https://x"\nfamily = "midjourney"\n', ["m6", "'family'"]),
        ('[models."m7"]\nadapter = "openai"\nbase_url = "https://x"\nfallbacks = ["nope"]\n', ["m7", "'fallbacks'"]),
    ],
)
def test_a_bad_providers_file_names_the_file_the_model_and_the_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ProvidersFileError) as raised:
        load_models(path, ADAPTERS)
    message = str(raised.value)
    assert str(path) in message
    for part in expected:
        assert part in message


def test_backoff_is_full_jitter_capped_and_never_below_retry_after():
    assert backoff_s(1, base_s=1, max_s=60, rng=lambda: 1.0) == 1
    assert backoff_s(4, base_s=1, max_s=60, rng=lambda: 1.0) == 8
    assert backoff_s(10, base_s=1, max_s=60, rng=lambda: 1.0) == 60
    assert backoff_s(3, base_s=1, max_s=60, rng=lambda: 0.0) == 0
    assert backoff_s(1, base_s=1, max_s=60, retry_after_s=7, rng=lambda: 0.5) == 7
    assert backoff_s(1, base_s=1, max_s=60, retry_after_s=600, rng=lambda: 0.5) == 60


def test_signed_urls_verify_and_expire():
    image_id = uuid.uuid4()
    url = signed_image_url("https://gw.example/", "secret", image_id, "image/png", ttl_s=60, now=1000)
    assert url.startswith(f"https://gw.example/files/images/{image_id}.png?expires=1060&signature=")
    signature = url.rsplit("=", 1)[1]
    assert verify("secret", image_id, "1060", signature, now=1059)
    assert not verify("secret", image_id, "1060", signature, now=1061)
    assert not verify("other", image_id, "1060", signature, now=1000)
    assert not verify("secret", uuid.uuid4(), "1060", signature, now=1000)
    assert not verify("secret", image_id, "9999", signature, now=1000)


def test_delivery_settings_are_at_least_once_and_below_the_visibility_timeout():
    settings = Settings(secret_key="s")
    config = celery_config(settings)
    visibility = config["broker_transport_options"]["visibility_timeout"]
    assert config["task_acks_late"] is True
    assert config["task_reject_on_worker_lost"] is True
    assert config["worker_prefetch_multiplier"] == 1
    assert config["task_soft_time_limit"] < config["task_time_limit"] < visibility
    assert settings.retry_max_s < visibility  # the longest retry countdown
    assert (
        settings.download_timeout_s + max(m.timeout_s for m in load_models(None).values())
        < config["task_soft_time_limit"]
    )


def test_settings_that_would_redeliver_a_running_task_are_refused():
    with pytest.raises(SettingsError):
        Settings(secret_key="s", task_time_limit_s=4000, visibility_timeout_s=3600).check()
    with pytest.raises(SettingsError):
        Settings(secret_key="s", retry_max_s=4000, visibility_timeout_s=3600).check()


def test_the_readme_providers_example_loads_with_one_model_per_adapter(tmp_path):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("### The providers file") :]
    example = section.split("```toml\n", 1)[1].split("```", 1)[0]
    models = load_models(write(tmp_path, example), installed_adapters())
    assert {model.adapter for model in models.values()} == installed_adapters()
