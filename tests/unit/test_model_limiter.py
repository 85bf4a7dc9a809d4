"""Which gate a worker keeps its per-model limits in, and the one refusal known before asking it."""

from __future__ import annotations

import pytest

from imagegate.app.providers import ModelConfig, ProvidersFileError, load_models
from imagegate.app.settings import Settings
from imagegate.workers.model_gate import RedisModelGate
from imagegate.workers.model_gate_local import LocalModelGate
from imagegate.workers.model_limiter import make_limiter, over_rate


def test_workers_share_the_brokers_redis_or_the_one_named_and_keep_them_alone_without(tmp_path):
    assert isinstance(make_limiter(Settings(broker_url="redis://127.0.0.1:6379/3")).gate, RedisModelGate)
    named = Settings(broker_url="amqp://guest@127.0.0.1//", model_limits_url="redis://127.0.0.1:6379/4")
    assert isinstance(make_limiter(named).gate, RedisModelGate)
    embedded = Settings(broker_url="filesystem://", data_dir=tmp_path, embedded=True)
    assert isinstance(make_limiter(embedded).gate, LocalModelGate)
    assert isinstance(make_limiter(Settings(broker_url="amqp://guest@127.0.0.1//")).gate, LocalModelGate)


def test_an_attempt_needing_more_calls_than_the_rpm_can_never_start():
    config = ModelConfig(name="m", adapter="openai", base_url="http://x", rpm=4)
    assert over_rate(config, 4) is None
    assert "needs 5 upstream calls" in over_rate(config, 5) and "rpm = 4" in over_rate(config, 5)
    assert over_rate(ModelConfig(name="m", adapter="local"), 10) is None


def test_the_providers_file_takes_both_keys_and_refuses_a_limit_below_one(tmp_path):
    path = tmp_path / "providers.toml"
    path.write_text('[models."m"]\nadapter = "local"\nmax_concurrency = 3\nrpm = 12\n')
    config = load_models(path, {"local"})["m"]
    assert (config.max_concurrency, config.rpm) == (3, 12)
    path.write_text('[models."m"]\nadapter = "local"\nrpm = 0\n')
    with pytest.raises(ProvidersFileError, match="model 'm': key 'rpm'"):
        load_models(path, {"local"})
